"""The documentation builds with warnings as errors and documents every public object."""

import importlib
import inspect
import re
import shutil
import subprocess
import sys
from html import unescape
from pathlib import Path

import pytest

from scmoesim import MoESim

pytest.importorskip("sphinx")
pytest.importorskip("myst_nb")
pytest.importorskip("furo")

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["datasets", "metrics", "pl", "similarity", "module", "nn", "train"]


@pytest.fixture(scope="module")
def html(tmp_path_factory) -> Path:
    """Build the docs from a copy of docs/, tutorials/ and README.md (the checkout stays clean)."""
    src = tmp_path_factory.mktemp("src")
    shutil.copytree(ROOT / "docs", src / "docs", symlinks=True)
    shutil.copytree(ROOT / "tutorials", src / "tutorials")
    shutil.copy(ROOT / "README.md", src / "README.md")
    for leftover in ("_build", "generated", "jupyter_execute"):
        shutil.rmtree(src / "docs" / leftover, ignore_errors=True)
    out = src / "html"
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "-q"]
    cmd += ["-d", str(src / "doctrees"), str(src / "docs"), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"sphinx-build failed:\n{proc.stdout}\n{proc.stderr}"
    return out


def test_pages_exist(html):
    for page in ["index", "installation", "quickstart", "model", "api"]:
        assert (html / f"{page}.html").is_file(), page


def test_tutorials_rendered_with_figures(html):
    for nb in sorted((ROOT / "tutorials").glob("*.ipynb")):
        page = html / "tutorials" / f"{nb.stem}.html"
        assert page.is_file(), nb.name
        assert "<img" in page.read_text(), f"{nb.name} was rendered without its figures"


def test_quickstart_is_the_readme(html):
    readme = (ROOT / "README.md").read_text()
    start = readme.index("```python", readme.index("## Quick start"))
    block = readme[start + len("```python") : readme.index("```", start + 3)]
    page = unescape(re.sub(r"<[^>]+>", "", (html / "quickstart.html").read_text()))
    missing = [line for line in block.splitlines() if line.strip() and line.strip() not in page]
    assert not missing, f"quickstart page lacks README lines: {missing}"


@pytest.mark.parametrize("module", MODULES)
def test_every_public_object_has_a_page(html, module):
    mod = importlib.import_module(f"scmoesim.{module}")
    public = getattr(mod, "__all__", None) or [
        name
        for name, value in vars(mod).items()
        if not name.startswith("_")
        and not inspect.ismodule(value)
        and getattr(value, "__module__", mod.__name__) == mod.__name__
    ]
    # functions and classes (module constants are documented where they carry a doc comment)
    public = [n for n in public if callable(getattr(mod, n))]
    pages = html / "generated"
    missing = [n for n in public if not (pages / f"scmoesim.{module}.{n}.html").is_file()]
    assert not missing, f"no API page for scmoesim.{module}: {missing}"


def test_model_page_documents_every_parameter(html):

    assert (html / "generated" / "scmoesim.MoESim.html").is_file()
    text = (ROOT / "docs" / "model.md").read_text()
    params = [
        p for p in inspect.signature(MoESim.__init__).parameters if p not in ("self", "adata")
    ]
    missing = [p for p in params if f"`{p}`" not in text]
    assert not missing, f"docs/model.md does not describe {missing}"


def test_text_sources_hold_no_control_characters():
    """A Python string with "\\frac" or "\\text" in it, written unescaped, leaves form feeds
    and tabs in the page (docs/model.md once rendered its weighted loss as "rac" and "ext")."""
    control = set("\x08\t\x0b\x0c\r")
    files = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "benchmarks").glob("*.md")]
    bad = {}
    for f in files:
        found = control & set(f.read_text(encoding="utf-8"))
        if found:
            bad[f.relative_to(ROOT).as_posix()] = sorted(hex(ord(c)) for c in found)
    assert len(files) > 10 and not bad, bad
