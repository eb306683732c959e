"""``make tensorboard-check``: what TensorBoard shows for two short runs, looked at in a real browser.

Trains a short RSO run and a short SGD run (``oneconv`` on a slice of MNIST) into one log folder, prints how
many points each main curve has, serves the folder with TensorBoard on localhost and takes screenshots of the
Time Series, Custom Scalars and HPARAMS pages with headless Chromium (Debian's ``chromium`` package) into
``results/tensorboard/``. Not part of ``make test``: it needs a browser and a minute or two.

    python -m experiments.tensorboard_check [--out results/tensorboard] [--logdir runs/tensorboard-check]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from rso import dashboard as tags

# forceSVG: Time Series draws its charts with WebGL, which a headless browser without a GPU leaves blank
PAGES = {"timeseries": "?forceSVG=true#timeseries", "custom_scalars": "#custom_scalars", "hparams": "#hparams"}
RUNS = {
    "rso": ["--optimizer", "rso", "--cycles", "2", "--batch-size", "500"],
    "sgd": ["--optimizer", "sgd", "--epochs", "2", "--batch-size", "100"],
}
COMMON = ["--model", "oneconv", "--train-subset", "3000", "--test-subset", "1000", "--bn-samples", "3000",
          "--threads", "1", "--no-progress"]


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    raise SystemExit("error: no chromium found; on Debian: apt-get install -y chromium")


def free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("localhost", 0))
        return handle.getsockname()[1]


def wait_for(url: str, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"error: TensorBoard did not answer on {url} within {seconds:.0f} s")


def screenshot(browser: str, url: str, path: Path, size: str, budget_ms: int) -> None:
    with tempfile.TemporaryDirectory(prefix="rso-chromium-") as profile:
        command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                   "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                   f"--user-data-dir={profile}", f"--window-size={size}", f"--virtual-time-budget={budget_ms}",
                   f"--screenshot={path}", url]
        subprocess.run(command, check=True, capture_output=True, timeout=180)
    if not path.is_file():
        raise SystemExit(f"error: chromium wrote no screenshot for {url}")


def summarize(logdir: Path) -> list[str]:
    """Points per main curve and run, read back from the event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lines = []
    for name in RUNS:
        events = EventAccumulator(str(logdir / name), size_guidance={"scalars": 0})
        events.Reload()
        counts = {tag: len(events.Scalars(tag)) for tag in (tags.TRAIN_LOSS, tags.TEST_ACCURACY, tags.TEST_LOSS)}
        first = events.Scalars(tags.TEST_ACCURACY)[0]
        lines.append(f"{name}: " + ", ".join(f"{tag} {count} points" for tag, count in counts.items())
                     + f"; first test accuracy at step {first.step}: {first.value:.4f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.tensorboard_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--logdir", default="runs/tensorboard-check", help="where the two runs go (emptied first)")
    parser.add_argument("--out", default="results/tensorboard", help="folder for the screenshots")
    parser.add_argument("--size", default="1600,1100", help="browser window, width,height")
    parser.add_argument("--budget-ms", type=int, default=30000, help="virtual time the page gets to load")
    parser.add_argument("--no-training", dest="train", action="store_false",
                        help="screenshot the runs already in --logdir (from an earlier check)")
    args = parser.parse_args(argv)
    browser = find_chromium()
    logdir, out = Path(args.logdir), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.train:
        shutil.rmtree(logdir, ignore_errors=True)
    for name, flags in RUNS.items() if args.train else ():
        command = [sys.executable, "-m", "rso.train", *COMMON, *flags, "--run-dir", str(logdir), "--name", name]
        print("$", " ".join(command[1:]), flush=True)
        subprocess.run(command, check=True)
    for line in summarize(logdir):
        print(line)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "localhost",
                               "--port", str(port), "--reload_interval", "0"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    try:
        wait_for(f"http://localhost:{port}/")
        time.sleep(3)  # let it finish reading the event files
        for page, fragment in PAGES.items():
            path = out / f"{page}.png"
            screenshot(browser, f"http://localhost:{port}/{fragment}", path.resolve(), args.size, args.budget_ms)
            print(f"wrote {path}")
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
