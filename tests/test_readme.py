"""The README's Python examples run as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_python_examples_in_the_readme_run(tmp_path, monkeypatch, data_dir):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README should show the library in use"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RSO_DATA_DIR", str(data_dir))
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
    assert (tmp_path / "runs" / "library-example" / "checkpoint.pt").is_file()
