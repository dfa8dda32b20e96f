"""The repository's promises: one repository URL everywhere, the same setup cell in every
chapter, every chapter in the table of contents, chapters saved with their outputs."""
import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
URL = CONFIG["repository"]["url"].rstrip("/")
CHAPTERS = sorted((ROOT / "chapters").glob("*.ipynb"))

SETUP_CELL = f'''# Setup. In Colab: install ddpm_lib from the book's repository, keeping Colab's torch.
# Locally and in CI: nothing to install.
import sys
if "google.colab" in sys.modules:
    %pip install -q "git+{URL}"
from ddpm_lib import book
cfg = book.setup()'''


def test_repository_settings():
    assert URL.startswith("https://github.com/")
    assert CONFIG["repository"]["branch"] == "main"
    assert CONFIG["launch_buttons"]["colab_url"] == "https://colab.research.google.com"


def test_no_other_github_owner_is_misspelled():
    """Links to other projects on GitHub name the projects' real homes (checked by hand once)."""
    known = {URL, "https://github.com/computationalmodelling/nbval"}
    for page in [*ROOT.glob("*.md"), *CHAPTERS]:
        for link in re.findall(r"https://github\.com/[\w.-]+/[\w.-]+", page.read_text()):
            assert link in known, f"{page.name} links to {link}: check it, then add it to `known`"


@pytest.mark.parametrize("path", ["README.md", "how_to_use.md", "pyproject.toml"])
def test_every_repository_link_agrees(path):
    text = (ROOT / path).read_text()
    links = set(re.findall(r"https://github\.com/[\w.-]+/[\w.-]+", text))
    assert links, f"{path} names no repository"
    assert links == {URL}, f"{path} links to {links - {URL}}; the repository is {URL} (_config.yml)"
    for colab in re.findall(r"https://colab\.research\.google\.com/github/([\w.-]+/[\w.-]+)/blob/(\w+)/", text):
        assert f"https://github.com/{colab[0]}" == URL and colab[1] == "main"


def test_chapters_are_in_the_toc():
    toc = (ROOT / "_toc.yml").read_text()
    for nb in CHAPTERS:
        assert f"chapters/{nb.stem}" in toc, f"{nb.name} is not in _toc.yml"


@pytest.mark.parametrize("nb_path", CHAPTERS, ids=[p.name for p in CHAPTERS])
def test_chapter_shape(nb_path):
    nb = json.loads(nb_path.read_text())
    cells = nb["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    # the first code cell is the shared setup cell, its output not compared (it names the profile)
    assert "".join(code[0]["source"]).strip() == SETUP_CELL
    assert "nbval-ignore-output" in code[0]["metadata"].get("tags", [])
    # one H1, first
    h1 = [line for c in cells if c["cell_type"] == "markdown" for line in "".join(c["source"]).splitlines()
          if line.startswith("# ")]
    assert len(h1) == 1 and "".join(cells[0]["source"]).startswith("# ")
    # committed with outputs, and no NBVAL_ comments (tags do that invisibly)
    assert all(c.get("execution_count") for c in code if "".join(c["source"]).strip()), "run it before committing"
    assert not any("NBVAL_" in "".join(c["source"]) for c in code)
    # the header states measured times per profile
    assert re.search(r"smoke[^\n]*\d+\s*s", "".join(cells[0]["source"])), "state the measured smoke time"


def test_readme_opens_every_chapter_in_colab():
    readme = (ROOT / "README.md").read_text()
    colab = URL.replace("https://github.com/", "https://colab.research.google.com/github/")
    for nb in CHAPTERS:
        assert f"({colab}/blob/main/chapters/{nb.name})" in readme, f"README has no Colab link for {nb.name}"


def test_benchmarks_page_matches_the_results():
    """benchmarks.md's tables are written from results/ by scripts/benchmarks_page.py."""
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmarks_page.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_how_to_use_lists_each_chapters_measured_time():
    """how_to_use.md's table of run times repeats what each chapter's header says it measured."""
    import re
    page = (ROOT / "how_to_use.md").read_text()
    for path in sorted((ROOT / "chapters").glob("*.ipynb")):
        header = "".join(json.loads(path.read_text())["cells"][0]["source"])
        m = re.search(r"smoke (\d+) s, cpu (\d+) s", header)
        assert m, f"{path.name}: no 'smoke X s, cpu Y s' in its first cell"
        title = header.splitlines()[0].lstrip("# ").strip()
        row = f"| {title} | {m[1]} s | {m[2]} s |"
        assert row in page, f"how_to_use.md lacks the row {row!r}"


def test_cross_references_are_roles_not_next_chapter():
    """Chapters move; "the next chapter" then points at the wrong one. Prose links with {doc}/{ref}."""
    pattern = re.compile(r"\b(next|previous|following|preceding) chapters?\b", re.IGNORECASE)
    for page in [*CHAPTERS, *ROOT.glob("*.md")]:
        if page.suffix == ".ipynb":
            texts = ["".join(c["source"]) for c in json.loads(page.read_text())["cells"]
                     if c["cell_type"] == "markdown"]
        else:
            texts = [page.read_text()]
        for text in texts:
            found = pattern.search(text)
            assert not found, (f"{page.name} says {text[max(0, found.start() - 40):found.end()]!r}: "
                               "link the chapter with {doc}`NN_name` instead")


CODE_LINE_LIMIT = 88     # the theme's code column shows about 90 characters before it clips


def test_chapter_code_fits_the_column():
    """A longer line is clipped at the column's right edge in the rendered page."""
    long_lines = []
    for nb_path in CHAPTERS:
        for index, cell in enumerate(json.loads(nb_path.read_text())["cells"]):
            if cell["cell_type"] == "code":
                long_lines += [f"{nb_path.name} cell {index}: {line.strip()[:60]}..."
                               for line in "".join(cell["source"]).split("\n")
                               if len(line) > CODE_LINE_LIMIT]
    assert not long_lines, (f"{len(long_lines)} chapter code lines over {CODE_LINE_LIMIT} "
                            "characters:\n" + "\n".join(long_lines[:20]))
