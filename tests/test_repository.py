"""The repository's promises: one repository URL everywhere, the same setup cell in every
chapter, every chapter in the table of contents, chapters saved with their outputs, and
pages that fit the column (code lines, folded checks, figure sizes)."""
import base64
import io
import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
URL = CONFIG["repository"]["url"].rstrip("/")
CHAPTERS = sorted((ROOT / "chapters").glob("*.ipynb"))

VERSION = re.search(r'^__version__ = "([^"]+)"$', (ROOT / "ddpm_lib" / "__init__.py").read_text(),
                    re.M).group(1)
TAG = f"v{VERSION}"           # the release the chapters install and Colab opens (scripts/release.py)
SETUP_CELL = f'''# Setup: where ddpm_lib is missing (Colab, Kaggle, Binder), install it,
# pinned to the release these chapters were written for (torch is kept).
REPO = "git+{URL}@{TAG}"
try:
    import ddpm_lib
except ImportError:
    %pip install -q "ddpm_lib[book] @ {{REPO}}"
from ddpm_lib import book
cfg = book.setup()'''


def test_repository_settings():
    assert URL.startswith("https://github.com/")
    assert CONFIG["repository"]["branch"] == TAG     # the launch buttons open the release
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
        assert f"https://github.com/{colab[0]}" == URL and colab[1] == TAG


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
    prose = [re.sub(r"^(`{3,}|~{3,}).*?^\1", "", "".join(c["source"]), flags=re.M | re.S)
             for c in cells if c["cell_type"] == "markdown"]       # without code blocks
    h1 = [line for text in prose for line in text.splitlines() if line.startswith("# ")]
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
        assert f"({colab}/blob/{TAG}/chapters/{nb.name})" in readme, f"README has no Colab link for {nb.name}"


def test_benchmarks_page_matches_the_results():
    """benchmarks.md's tables are written from ddpm_lib/results/ by scripts/benchmarks_page.py."""
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


CODE_LINE_LIMIT = 76     # measured: the code column holds 77 characters at 1280 px (14 px DejaVu Sans Mono)


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


FOLD_TAGS = {"hide-cell", "hide-input", "hide-output"}


def test_folded_cells_say_what_they_hide():
    """A folded cell shows one line instead of itself (how_to_use.md, "Folded checks"):
    MyST-NB's code_prompt_show. A folded check (hide-cell) states what it checked."""
    bad = []
    for nb_path in CHAPTERS:
        for index, cell in enumerate(json.loads(nb_path.read_text())["cells"]):
            tags = set(cell["metadata"].get("tags", []))
            if cell["cell_type"] != "code" or not tags & FOLD_TAGS:
                continue
            prompt = cell["metadata"].get("mystnb", {}).get("code_prompt_show", "")
            where = f"{nb_path.name} cell {index}"
            if not prompt or "\n" in prompt or len(prompt) > 110 or "$" in prompt:
                bad.append(f"{where}: prompt {prompt!r} (one line of plain text, 1 to 110 characters)")
            elif "hide-cell" in tags and not prompt.startswith("Checked: "):
                bad.append(f"{where}: a folded check's prompt starts with 'Checked: ', got {prompt!r}")
    assert not bad, "\n".join(bad)


def _png_outputs():
    for nb_path in CHAPTERS:
        for index, cell in enumerate(json.loads(nb_path.read_text())["cells"]):
            for output in cell.get("outputs", []):
                png = output.get("data", {}).get("image/png")
                if png:
                    yield f"{nb_path.name} cell {index}", base64.b64decode(png)


def test_figures_fit_the_column_and_have_a_background():
    """Every chapter figure is drawn at most viz.COLUMN_WIDTH wide (shown at its own size, so
    its labels are read at 10 pt) on an opaque background (readable in the dark theme)."""
    from PIL import Image

    from ddpm_lib import viz
    max_width = round(viz.COLUMN_WIDTH * viz.FIGURE_DPI * 1.03)
    bad = []
    for where, data in _png_outputs():
        image = Image.open(io.BytesIO(data))
        if image.width > max_width:
            bad.append(f"{where}: {image.width} px wide (at most {max_width})")
        if "A" in image.getbands() and image.getchannel("A").getextrema()[0] < 255:
            bad.append(f"{where}: transparent pixels (dark text would vanish in the dark theme)")
    assert not bad, "\n".join(bad)


def test_library_source_printed_by_chapters_fits_the_column():
    """Chapters print library code with print(inspect.getsource(...)); it obeys the same limit.
    (Chapter 11 prints a few chosen lines of train(); those are short.)"""
    import inspect

    import ddpm_lib.layers
    import ddpm_lib.runs
    import ddpm_lib.train
    import ddpm_lib.unet
    modules = [ddpm_lib.unet, ddpm_lib.train, ddpm_lib.runs, ddpm_lib.layers]
    bad = []
    for nb_path in CHAPTERS:
        for cell in json.loads(nb_path.read_text())["cells"]:
            for name in re.findall(r"print\(inspect\.getsource\(([\w.]+)\)\)", "".join(cell["source"])):
                first, *rest = name.split(".")
                found = [m for m in modules if hasattr(m, first)]
                assert found, f"{nb_path.name} prints {name}: add its module to this test"
                obj = getattr(found[0], first)
                for part in rest:
                    obj = getattr(obj, part)
                bad += [f"{nb_path.name} prints {name}: {line.strip()[:60]}..."
                        for line in inspect.getsource(obj).split("\n") if len(line) > CODE_LINE_LIMIT]
    assert not bad, "\n".join(bad)


def test_long_runs_show_progress():
    """Cells whose outputs nbval ignores hold the profile-sized (long) runs: none of them may
    switch the progress bar off; they pass progress=cfg.progress (off in smoke)."""
    silent = []
    for nb_path in CHAPTERS:
        for i, cell in enumerate(json.loads(nb_path.read_text())["cells"]):
            tags = cell["metadata"].get("tags", [])
            if cell["cell_type"] == "code" and "nbval-ignore-output" in tags:
                if "progress=False" in "".join(cell["source"]):
                    silent.append(f"{nb_path.name} cell {i}")
    assert not silent, f"long runs without a progress bar: {silent}"
