"""Pin the book to a release of ddpm_lib: every place that installs or opens the book from
GitHub names the same tag, v<version>, where <version> is ``ddpm_lib.__version__``.

    python scripts/release.py            # check that every pin agrees (exit 1 if not)
    python scripts/release.py 0.2.0      # set __version__ to 0.2.0 and rewrite every pin

The repository's address lives in _config.yml (``repository.url``), the version in
ddpm_lib/__init__.py (pyproject.toml reads it from there). The pins this script keeps:

* the first cell of every chapter (``REPO = "git+<url>@v<version>"``),
* the install line of every assignment master and assignments/autograder_requirements.txt,
* the README's "Open in Colab" links, the pip lines and the release named in the pages'
  prose (`` `v<version>` ``), the launch buttons (_config.yml ``repository.branch``).

A release: run it with the new version, commit, then ``git tag v<version>`` and push the
tag; the workflow (.github/workflows/book.yml) publishes the book on release tags. Until the
tag is pushed, the setup cells and Colab links of the new version point at nothing.
tests/test_release.py runs the check.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
INIT = ROOT / "ddpm_lib" / "__init__.py"
CONFIG = ROOT / "_config.yml"
URL = yaml.safe_load(CONFIG.read_text())["repository"]["url"].rstrip("/")
COLAB = URL.replace("https://github.com/", "https://colab.research.google.com/github/")

# What a pin looks like in each kind of file: the address, then a ref (a tag or a branch).
GIT = re.compile(re.escape(f"git+{URL}") + r"(@[\w.-]+)?")
BLOB = re.compile(re.escape(COLAB) + r"/blob/([\w.-]+)/")
BRANCH = re.compile(r"^(  branch: )(\S+)$", re.M)
NAMED = re.compile(r"`v(\d+\.\d+\.\d+)`")          # the release named in prose: `v0.1.0`


def version() -> str:
    return re.search(r'^__version__ = "([^"]+)"$', INIT.read_text(), re.M).group(1)


def pinned_files() -> list[Path]:
    return [*sorted(ROOT.glob("*.md")), ROOT / "assignments" / "autograder_requirements.txt",
            *sorted((ROOT / "chapters").glob("*.ipynb")),
            *sorted((ROOT / "assignments").glob("*.ipynb"))]


def pins(text: str) -> list[str]:
    """The refs a text pins: ``@ref`` after each git address, ``blob/ref/`` in Colab links
    (an unpinned git address counts as ``main``)."""
    return ([(m.group(1) or "@main")[1:] for m in GIT.finditer(text)]
            + [m.group(1) for m in BLOB.finditer(text)]
            + [f"v{m.group(1)}" for m in NAMED.finditer(text)])


def disagreements() -> list[str]:
    """Every pin that is not v<version>, as 'file: ref'."""
    tag = f"v{version()}"
    bad = []
    for path in pinned_files():
        bad += [f"{path.relative_to(ROOT)}: {ref}" for ref in pins(path.read_text()) if ref != tag]
    branch = BRANCH.search(CONFIG.read_text()).group(2)
    if branch != tag:
        bad.append(f"_config.yml repository.branch: {branch}")
    return bad


def set_version(new: str) -> None:
    if not re.fullmatch(r"\d+\.\d+\.\d+", new):
        raise SystemExit(f"a version is MAJOR.MINOR.PATCH, got {new!r}")
    tag = f"v{new}"
    INIT.write_text(re.sub(r'^__version__ = "[^"]+"$', f'__version__ = "{new}"',
                           INIT.read_text(), flags=re.M))
    for path in pinned_files():
        text = GIT.sub(f"git+{URL}@{tag}", path.read_text())
        text = BLOB.sub(f"{COLAB}/blob/{tag}/", text)
        path.write_text(NAMED.sub(f"`{tag}`", text))
    CONFIG.write_text(BRANCH.sub(rf"\g<1>{tag}", CONFIG.read_text()))


if __name__ == "__main__":
    if len(sys.argv) > 1:
        set_version(sys.argv[1])
    bad = disagreements()
    print("\n".join(bad) if bad else f"every pin is v{version()}")
    sys.exit(1 if bad else 0)
