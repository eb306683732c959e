"""The README: its Python examples run and do what they say; its generated results section is exactly what
``experiments.readme_section`` makes from ``results/``."""

import json
import re
from pathlib import Path

from experiments import readme_section

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def test_python_examples_in_the_readme_run(tmp_path, monkeypatch, data_dir, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README should show the library in use"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RSO_DATA_DIR", str(data_dir))
    namespace = {"__name__": "readme"}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    metrics = namespace["metrics"]
    folder = tmp_path / "runs" / "library-example"
    assert metrics["run_folder"] == str(Path("runs") / "library-example") and (folder / "checkpoint.pt").is_file()
    # one cycle of oneconv visits each of its 7890 weights once, and it learns (chance is 0.1)
    assert metrics["visits"] == 7890 and metrics["cycles_done"] == 1 and metrics["test_accuracy"] > 0.5
    assert json.loads((folder / "final.json").read_text())["test_accuracy"] == metrics["test_accuracy"]
    printed = capsys.readouterr().out.strip().splitlines()
    assert f"{metrics['test_accuracy']} {metrics['visits']} {metrics['run_folder']}" in printed


def test_the_generated_region_is_what_readme_section_makes_from_results():
    text = README.read_text()
    assert text.count(readme_section.BEGIN) == 1 and text.count(readme_section.END) == 1
    region = text.split(readme_section.BEGIN, 1)[1].split(readme_section.END, 1)[0]
    expected = readme_section.section(ROOT / "results", "results")
    assert readme_section.BEGIN + region == expected.rstrip() + "\n", "run `make readme` after changing results/"
