"""Local copies of the JavaScript the rendered book loads from CDNs, for tests/test_browser.py.

The built HTML loads MathJax 3 (jupyter-book 1 / sphinx.ext.mathjax), require.js and the
ipywidgets embed manager (myst-nb, on pages with saved widget state) from public CDNs. CI
has no CDN, only the npm registry, so this module fetches the same files as npm packages
(`npm pack`, the tarball only: no dependencies, nothing runs) into a cache folder, and
`local_file()` answers which local file stands in for a CDN address.

    python tests/browser_assets.py          # fetch what is missing (needs npm), print the folder

The folder is $DDPM_BROWSER_ASSETS, else ~/.cache/ddpm-book/browser-assets. If the book
starts asking for another package or version (a myst-nb or jupyter-book upgrade), the
browser test fails naming the address; add its npm spec to NPM_SPECS (and, for a CDN
address that does not follow the jsdelivr/unpkg `npm/<name>@<version>/<path>` pattern,
to ALIASES).
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

# npm specs, written exactly as the CDN addresses in the built HTML write them.
NPM_SPECS = [
    "mathjax@3",                             # cdn.jsdelivr.net/npm/mathjax@3/es5/tex-mml-chtml.js (+ its fonts)
    "@jupyter-widgets/html-manager@1.0.6",   # cdn.jsdelivr.net/npm/@jupyter-widgets/html-manager@1.0.6/dist/embed-amd.js
    "requirejs@2.3.4",                       # cdnjs: ajax/libs/require.js/2.3.4/require.min.js (below)
]

# CDN addresses outside the npm/<name>@<version>/<path> pattern: address -> (spec, path in package).
ALIASES = {
    "https://cdnjs.cloudflare.com/ajax/libs/require.js/2.3.4/require.min.js": ("requirejs@2.3.4", "require.js"),
}

# Hosts that serve npm packages as npm/<name>@<version>/<path> (jsdelivr) or <name>@<version>/<path> (unpkg).
_NPM_CDN = re.compile(r"^https://(?:cdn\.jsdelivr\.net/npm|unpkg\.com)/((?:@[^/@]+/)?[^/@]+@[^/]+)/(.*)$")


def asset_dir():
    default = Path.home() / ".cache" / "ddpm-book" / "browser-assets"
    return Path(os.environ.get("DDPM_BROWSER_ASSETS", default)).expanduser()


def _package_dir(spec, root=None):
    return (root or asset_dir()) / spec


def missing(root=None):
    """The specs of NPM_SPECS not fetched yet."""
    return [s for s in NPM_SPECS if not (_package_dir(s, root) / "package.json").is_file()]


def is_cdn(url):
    return url in ALIASES or bool(_NPM_CDN.match(url))


def local_file(url, root=None):
    """(spec, local path) standing in for a CDN address; the path may not exist.
    None if the address is not a CDN address of an npm package."""
    url = url.split("#")[0].split("?")[0]
    if url in ALIASES:
        spec, rel = ALIASES[url]
    else:
        m = _NPM_CDN.match(url)
        if not m:
            return None
        spec, rel = m.groups()
    base = _package_dir(spec, root).resolve()
    path = (base / rel).resolve()
    if base != path and base not in path.parents:  # no ../ out of the package
        return spec, base / "__outside__"
    return spec, path


def fetch(specs=None, root=None):
    """Fetch each spec's tarball with `npm pack` and unpack it to <root>/<spec>/. Idempotent."""
    root = root or asset_dir()
    todo = [s for s in (specs or NPM_SPECS) if not (_package_dir(s, root) / "package.json").is_file()]
    if not todo:
        return root
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is not installed (Debian: apt-get install nodejs npm)")
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        out = subprocess.run([npm, "pack", "--json", "--pack-destination", tmp, *todo], check=True,
                             capture_output=True, text=True, cwd=tmp).stdout
        packed = json.loads(out)
        assert len(packed) == len(todo), out
        for spec, info in zip(todo, packed):
            unpacked = Path(tmp) / ("x-" + info["filename"])
            with tarfile.open(Path(tmp) / info["filename"]) as tar:
                tar.extractall(unpacked, filter="data")
            dest = _package_dir(spec, root)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(dest, ignore_errors=True)
            (unpacked / "package").rename(dest)  # npm tarballs hold one folder, package/
            print(f"fetched {spec} ({info['name']}@{info['version']}) -> {dest}")
    return root


if __name__ == "__main__":
    try:
        print(f"browser assets in {fetch()}")
    except (RuntimeError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or ""
        print(f"could not fetch the browser test's npm assets: {err}\n{detail}", file=sys.stderr)
        sys.exit(1)
