"""The README a newcomer reads and the manual in docs/: the README short, the manual
built as CI builds it (`mkdocs build --strict`: a broken link, a missing page or an API
page whose docstrings do not resolve fails)."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO


def test_the_readme_is_a_few_minutes_of_reading():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) < 300
    for page in ("studies", "families", "language-models", "images", "results", "resume",
                 "performance", "cluster", "layout"):
        assert f"docs/{page}.md" in readme, page  # the README links the whole manual


@pytest.mark.slow
def test_the_manual_builds_strictly(tmp_path):
    mkdocs = Path(sys.executable).parent / "mkdocs"
    if not mkdocs.exists() and shutil.which("mkdocs") is None:
        pytest.fail("mkdocs is not installed: `make install` installs the test extra")
    r = subprocess.run([str(mkdocs if mkdocs.exists() else "mkdocs"), "build", "--strict",
                        "--site-dir", str(tmp_path / "site")], cwd=REPO, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert (tmp_path / "site" / "language-models" / "index.html").exists()
    api = (tmp_path / "site" / "api" / "sampling" / "index.html").read_text()
    assert "StoryDraws" in api and "u(seed, k)" in api  # docstrings rendered
