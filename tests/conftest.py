import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"  # small real data shipped with the repository


# The family block of the tiny language-model studies the end-to-end tests run (a
# 0.2M-parameter model on grammar stories, one epoch): indent 2, under `family:`.
TINY_LM = """\
  name: lm
  vocab_size: 300
  model: tiny
  context: 64
  max_new_tokens: 40
  batch_size: 8
  epochs: 1
  sample_batch_size: 100
  log_every: 5
"""


def write_study(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def collapse_exe() -> str:
    """The `collapse` console script of the Python running the tests (whether or not
    its virtual environment is activated, as under `make test`)."""
    beside = Path(sys.executable).parent / "collapse"
    return str(beside) if beside.exists() else shutil.which("collapse")


def collapse(*args, cwd=None, timeout=600, env=None) -> subprocess.CompletedProcess:
    """Run the real `collapse` console script as a user would (`env`: variables to add)."""
    return subprocess.run([collapse_exe(), *map(str, args)], cwd=cwd or REPO, capture_output=True,
                          text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the tests that call the engine in-process."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def chromium() -> str | None:
    """Debian's Chromium (`.ci/run` installs it); None where it is not installed."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def render_page(page: Path, tmp: Path, height: int = 6000) -> tuple[str, Path]:
    """Open an HTML file in headless Chromium: the DOM it built, and a screenshot."""
    browser = chromium()
    if browser is None:
        pytest.skip("no Chromium here to render the page (apt-get install chromium)")
    common = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp / 'chromium-profile'}"]
    dom = subprocess.run([*common, "--dump-dom", page.as_uri()], capture_output=True,
                         text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    shot = tmp / "page.png"
    r = subprocess.run([*common, f"--window-size=1200,{height}", f"--screenshot={shot}",
                        page.as_uri()], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and shot.exists(), r.stderr[-2000:]
    return dom.stdout, shot
