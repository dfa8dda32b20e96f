"""The book is pinned to one release: every setup cell, Colab link, pip line and the
autograder's requirements install or open v<ddpm_lib.__version__> (scripts/release.py), and
the package's version is that same number."""
import importlib.util
import json
import re
import shutil
import tomllib
from pathlib import Path

import ddpm_lib

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("release", ROOT / "scripts" / "release.py")
release = importlib.util.module_from_spec(spec)
spec.loader.exec_module(release)


def test_every_pin_names_the_release():
    assert release.version() == ddpm_lib.__version__
    assert release.disagreements() == []


def test_the_package_version_is_read_from_ddpm_lib():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "ddpm_lib.__version__"}


def test_every_chapter_and_assignment_installs_the_release():
    tag = f"v{ddpm_lib.__version__}"
    for nb in [*sorted((ROOT / "chapters").glob("*.ipynb")), *sorted((ROOT / "assignments").glob("*.ipynb"))]:
        first = next(c for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code")
        source = "".join(first["source"])
        assert release.pins(source) == [tag], f"{nb.name}: its setup cell must install {tag}"
        assert "except ImportError:" in source and "%pip install" in source, nb.name
    requirements = (ROOT / "assignments" / "autograder_requirements.txt").read_text()
    assert f"ddpm_lib @ git+{release.URL}@{tag}" in requirements


def test_pins_are_read_and_a_stale_one_is_reported(tmp_path, monkeypatch):
    url, colab = release.URL, release.COLAB
    text = (f'%pip install "git+{url}@v9.9.9" x\n[link]({colab}/blob/main/chapters/a.ipynb)\n'
            f'pip install "git+{url}" and the release `v0.0.1`')
    assert release.pins(text) == ["v9.9.9", "main", "main", "v0.0.1"]
    # a copy of the repository's pinned files, one of them stale, is caught and then fixed
    root = tmp_path / "book"
    for path in [*release.pinned_files(), release.INIT, release.CONFIG]:
        target = root / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    stale = root / "README.md"
    stale.write_text(stale.read_text() + f'\npip install "git+{url}@main"\n')
    monkeypatch.setattr(release, "ROOT", root)
    monkeypatch.setattr(release, "INIT", root / "ddpm_lib" / "__init__.py")
    monkeypatch.setattr(release, "CONFIG", root / "_config.yml")
    assert release.disagreements() == ["README.md: main"]
    release.set_version("1.2.3")
    assert release.disagreements() == [] and release.version() == "1.2.3"
    assert f"{colab}/blob/v1.2.3/chapters/01_intuition.ipynb" in stale.read_text()
    assert re.search(r"^  branch: v1\.2\.3$", (root / "_config.yml").read_text(), re.M)
