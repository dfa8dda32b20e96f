"""The rendered book in a real browser: every page of _toc.yml opened in headless Chromium.

For each page: no errors of its own in the console, math typeset by MathJax, every image
loaded, the Colab launch button pointing at the page's notebook, saved widgets rendered,
exercise solutions opening on click; and a full-page screenshot for people to look at
($DDPM_SCREENSHOTS, else a pytest tmp folder; `make test` puts them in _build/screenshots).
test_page_fits opens every page again at 1280 px (the book's default) and 390 px (a phone)
wide and fails on code, outputs or equations wider than their box or the column, and on a
page that scrolls sideways; summary.json records each page's height and the share of it
taken by visible code (folded checks do not count), and a dark-theme screenshot at 1280 px.

Needs Debian's chromium (/usr/bin/chromium, or $DDPM_CHROMIUM), the Python package
playwright (it drives that Chromium; never `playwright install`) and the CDN files as npm
packages (`python tests/browser_assets.py`). Without them the test skips, unless
DDPM_REQUIRE_BROWSER=1 (CI), where it fails. No request leaves the machine: the book is
served from 127.0.0.1, CDN requests are answered from the npm copies, anything else is
aborted (and listed in the summary). $DDPM_BOOK_HTML=<folder> tests an existing build
(e.g. _build/html after `make book`) instead of building the book.
"""
import base64
import functools
import hashlib
import html as html_lib
import http.server
import json
import os
import re
import threading
from pathlib import Path

import pytest
import yaml

import browser_assets

ROOT = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
REPO_URL = CONFIG["repository"]["url"].rstrip("/")
CHROMIUM = os.environ.get("DDPM_CHROMIUM", "/usr/bin/chromium")
REQUIRED = os.environ.get("DDPM_REQUIRE_BROWSER") == "1"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]
TIMEOUT_MS = 60_000


def toc_pages(toc_path=ROOT / "_toc.yml"):
    """Every document of the table of contents, in reading order (root first)."""
    toc = yaml.safe_load(toc_path.read_text())
    pages = [toc["root"]]

    def walk(entries):
        for entry in entries or []:
            if "file" in entry:
                pages.append(entry["file"])
            for key in ("parts", "chapters", "sections"):
                walk(entry.get(key))

    walk([{key: toc.get(key)} for key in ("parts", "chapters", "sections")])
    return [p.removesuffix(".md").removesuffix(".ipynb") for p in pages]


PAGES = toc_pages()

# Errors that the book's pages show in any browser, caused by the pinned jupyter-book stack
# itself, not by the book's content. Each is (where, pattern, why); the summary lists every
# match. Anything else that a page logs as an error fails the test.
KNOWN_UPSTREAM = [
    ("pageerror", r"^Identifier 'THEBE_JS_URL' has already been declared$",
     "sphinx-thebe 0.3.1's inline config script (`const THEBE_JS_URL = ...`) is in every page twice "
     "(jupyter-book 1.0.4, Sphinx 7.4; sphinx-togglebutton's too, which uses `var`); thebe is not used"),
    ("console", r"^Got invalid theme mode: \. Resetting to auto\.$",
     "pydata-sphinx-theme 0.17 on a first visit (nothing in localStorage yet)"),
    ("request", r"/@jupyter-widgets/html-manager/dist/[0-9a-f]{20}\.(?:woff2?|ttf|eot|svg)$",
     "@jupyter-widgets/html-manager 1.0.6 asks for its FontAwesome fonts relative to the page "
     "instead of the CDN (404 on any host); the widgets use no icons"),
]


def _known(where, text):
    return next((why for w, pattern, why in KNOWN_UPSTREAM if w == where and re.search(pattern, text)), None)


# --- what the test needs, and skipping/failing without it ---------------------------------

def _missing_tools():
    missing = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the Python package playwright (`make browser` installs the pinned version)")
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        missing.append(f"Chromium at {CHROMIUM} (Debian: apt-get install chromium; or set DDPM_CHROMIUM)")
    if browser_assets.missing():
        missing.append(f"the npm packages {browser_assets.missing()} in {browser_assets.asset_dir()} "
                       "(needs npm: python tests/browser_assets.py)")
    return missing


@pytest.fixture(scope="session")
def tools():
    missing = _missing_tools()
    if missing:
        message = "browser test needs " + "; ".join(missing)
        if REQUIRED:
            pytest.fail(message + " (DDPM_REQUIRE_BROWSER=1, so this is an error)", pytrace=False)
        pytest.skip(message)


# --- the book, served on localhost ---------------------------------------------------------

@pytest.fixture(scope="session")
def book_html(tools, request):
    """The built HTML folder: $DDPM_BOOK_HTML, else the session's build (`book_build`, in
    conftest.py). Warnings are test_book_build's business; here the pages only have to exist."""
    if os.environ.get("DDPM_BOOK_HTML"):
        html = Path(os.environ["DDPM_BOOK_HTML"]).resolve()
        assert (html / "index.html").is_file(), f"DDPM_BOOK_HTML={html} holds no index.html"
        return html
    build = request.getfixturevalue("book_build")
    assert (build.html / "index.html").is_file(), build.output
    return build.html


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="session")
def server(book_html):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                            functools.partial(_QuietHandler, directory=str(book_html)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}/"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="session")
def browser(tools):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="session")
def screenshot_dir(tmp_path_factory):
    folder = Path(os.environ["DDPM_SCREENSHOTS"]) if os.environ.get("DDPM_SCREENSHOTS") \
        else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    summary = {}
    yield folder, summary
    (folder / "summary.json").write_text(json.dumps(summary, indent=1))
    fits = {k: v for k, v in sorted(summary.items()) if "@" in k and "height" in v}
    if fits:
        print("\npage heights (px) and the share taken by visible code:")
        for key, v in fits.items():
            print(f"  {key:<36} {v['height']:>7,} px  code {v['code_share']:.3f}")
    print(f"\nbrowser test: screenshots and summary.json in {folder}")


# --- one page ------------------------------------------------------------------------------

class PageLog:
    """Network interception and everything the page reports, sorted into own and not."""

    def __init__(self, base):
        self.base = base
        self.errors = []          # the page's own errors: fail the test
        self.upstream = []        # KNOWN_UPSTREAM matches: listed, allowed
        self.external = []        # requests to other hosts, aborted: listed, allowed
        self.cdn = []             # CDN requests answered from the npm copies
        self.missing_assets = []  # CDN requests with no npm copy: fail, with what to fetch
        self.sri_dropped = []     # integrity hashes removed because the npm copy is another build
        self.failed = set()       # own URLs answered with an HTTP error

    def own(self, url):
        return url.startswith(self.base)

    def route(self, route):
        request = route.request
        url = request.url
        if self.own(url):
            if request.resource_type == "document":
                return self._document(route)
            return route.continue_()
        found = browser_assets.local_file(url)
        if found is not None:
            spec, path = found
            if path.is_file():
                self.cdn.append(url)
                return route.fulfill(path=str(path), headers={"Access-Control-Allow-Origin": "*"})
            self.missing_assets.append(f"{url} (npm {spec}: add it to tests/browser_assets.py NPM_SPECS)")
        else:
            self.external.append(url)
        return route.abort()

    def _document(self, route):
        """Serve the page as built, except for integrity hashes of CDN scripts whose npm copy
        is a different build of the same release (cdnjs's require.min.js is minified by cdnjs;
        npm's requirejs ships require.js): the browser would refuse the copy."""
        response = route.fetch()
        body = response.text()

        def check(m):
            tag = m.group(0)
            src = re.search(r'\bsrc="([^"]+)"', tag)
            found = browser_assets.local_file(html_lib.unescape(src.group(1))) if src else None
            if not found or not found[1].is_file():
                return tag
            algo, _, want = re.search(r'\bintegrity="([^"]+)"', tag).group(1).partition("-")
            have = base64.b64encode(hashlib.new(algo, found[1].read_bytes()).digest()).decode()
            if have == want:
                return tag
            self.sri_dropped.append(src.group(1))
            return re.sub(r'\s+integrity="[^"]*"', "", tag)

        body = re.sub(r"<script\b[^>]*\bintegrity=\"[^\"]*\"[^>]*>", check, body)
        return route.fulfill(response=response, body=body)

    def on_console(self, msg):
        # "Failed to load resource" repeats a failed request, which on_response/on_requestfailed
        # (the site's own files) or route (other hosts, aborted on purpose) already recorded.
        if msg.type != "error" or msg.text.startswith("Failed to load resource"):
            return
        source = (msg.location or {}).get("url", "")
        why = _known("console", msg.text)
        (self.upstream if why else self.errors).append(f"console error: {msg.text} [{source}]")

    def on_pageerror(self, err):
        text = getattr(err, "message", None) or str(err)
        why = _known("pageerror", text)
        (self.upstream if why else self.errors).append(f"page error: {text}")

    def on_response(self, response):
        if self.own(response.url) and response.status >= 400:
            self.failed.add(response.url)
            why = _known("request", response.url)
            (self.upstream if why else self.errors).append(f"HTTP {response.status} for the site's own {response.url}")

    def on_requestfailed(self, request):
        if self.own(request.url) and request.url not in self.failed:  # not already an HTTP error
            why = _known("request", request.url)
            (self.upstream if why else self.errors).append(f"request failed: {request.url} ({request.failure})")


# Text of the article outside code, outputs and widgets, typeset math shown as <math>: no TeX
# delimiters may be left there (e.g. `$$...$$` inside a paragraph, which MyST does not parse).
_PROSE_JS = """() => {
  const article = document.querySelector('article') || document.body;
  const copy = article.cloneNode(true);
  copy.querySelectorAll('pre, code, script, style, textarea, .cell_output, .output, .widget-subarea, .highlight')
      .forEach(e => e.remove());
  copy.querySelectorAll('mjx-container').forEach(e => e.replaceWith('<math>'));
  return copy.textContent.replace(/\\s+/g, ' ');
}"""
_RAW_TEX = re.compile(r"\$\$|\\\(|\\\)|\\\[|\\\]|\\begin\{|\$[^\s$][^$]{0,200}?[^\s$\\]\$")

_IMAGES_JS = """async () => {
  const imgs = [...document.querySelectorAll('article img')];
  for (const img of imgs) { img.loading = 'eager'; }
  await Promise.all(imgs.map(img => img.complete ? null
      : new Promise(done => { img.addEventListener('load', done); img.addEventListener('error', done); })));
  return imgs.map(img => ({src: img.currentSrc || img.src, w: img.naturalWidth, h: img.naturalHeight}));
}"""


def colab_url(docname):
    owner_repo = REPO_URL.removeprefix("https://github.com/")
    branch = CONFIG["repository"]["branch"]        # the release tag (scripts/release.py)
    return f"https://colab.research.google.com/github/{owner_repo}/blob/{branch}/{docname}.ipynb"


@pytest.mark.parametrize("docname", PAGES)
def test_page_in_browser(docname, browser, server, book_html, screenshot_dir):
    folder, summary = screenshot_dir
    source = (book_html / f"{docname}.html").read_text()
    has_math = bool(re.search(r'class="math[ "]', source))
    n_widget_views = source.count('type="application/vnd.jupyter.widget-view+json"')
    is_notebook = (ROOT / f"{docname}.ipynb").is_file()

    log = PageLog(server)
    context = browser.new_context(viewport={"width": 1280, "height": 900}, service_workers="block")
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.route("**/*", log.route)
    page.on("console", log.on_console)
    page.on("pageerror", log.on_pageerror)
    page.on("response", log.on_response)
    page.on("requestfailed", log.on_requestfailed)
    problems = []
    found = {"page": docname}
    try:
        response = page.goto(server + f"{docname}.html", wait_until="load")
        assert response is not None and response.status == 200, f"{docname}.html: HTTP {response and response.status}"

        # Math: MathJax 3 typesets every .math element, with no TeX errors and no TeX left over.
        if has_math:
            page.wait_for_function("() => window.MathJax && window.MathJax.startup && window.MathJax.startup.promise")
            page.evaluate("() => MathJax.startup.promise.then(() => true)")
            math = page.evaluate("""() => {
              const errors = [];  // TeX errors (merror) and undefined macros (noundefined: red \\name)
              for (const item of MathJax.startup.document.math) {
                const mml = MathJax.startup.toMML(item.root);
                if (mml.includes('<merror') || /<mtext mathcolor="red">\\\\/.test(mml)) errors.push(item.math.slice(0, 80));
              }
              return {
                containers: document.querySelectorAll('mjx-container').length,
                elements: document.querySelectorAll('.math').length,
                untypeset: [...document.querySelectorAll('.math')].filter(e => !e.querySelector('mjx-container'))
                             .map(e => e.textContent.slice(0, 80)),
                errors,
              };
            }""")
            found["math"] = {"mjx_container": math["containers"], "math_elements": math["elements"]}
            if math["containers"] == 0:
                problems.append("page has math but MathJax typeset none (no mjx-container)")
            if math["untypeset"]:
                problems.append(f"{len(math['untypeset'])} math elements not typeset, e.g. {math['untypeset'][:3]}")
            if math["errors"]:
                problems.append(f"MathJax TeX errors: {math['errors'][:5]}")
        prose = page.evaluate(_PROSE_JS)
        leftovers = [prose[max(0, m.start() - 40):m.end() + 40] for m in _RAW_TEX.finditer(prose)]
        found["raw_tex"] = leftovers
        if leftovers:
            problems.append(f"TeX left untypeset in the text ({len(leftovers)}): " + " | ".join(leftovers[:5]))

        # Widgets: every saved widget view rendered by the embed manager, sliders visible.
        if n_widget_views:
            page.wait_for_selector(".widget-subarea .jupyter-widgets", state="attached")
            page.wait_for_function(f"() => document.querySelectorAll('.widget-subarea').length >= {n_widget_views}")
            rendered = page.locator(".widget-subarea:has(.jupyter-widgets)").count()
            sliders = page.locator(".widget-slider")
            visible = [sliders.nth(i).is_visible() for i in range(sliders.count())]
            readouts = [t.strip() for t in page.locator(".widget-slider .widget-readout").all_inner_texts()]
            found["widgets"] = {"views": n_widget_views, "rendered": rendered, "sliders": len(visible),
                                "sliders_visible": sum(visible), "slider_readouts": readouts}
            if rendered != n_widget_views:
                problems.append(f"{rendered} of {n_widget_views} saved widget views rendered")
            if "SliderModel" in source and not any(visible):
                problems.append("the page saves a slider, but no .widget-slider is visible")
            if any(not r for r in readouts):
                problems.append(f"a slider shows no value: readouts {readouts}")
            if page.get_by_text("Error displaying widget").count():
                problems.append("the embed manager says 'Error displaying widget'")

        # Images: each figure in the article loads.
        images = page.evaluate(_IMAGES_JS)
        broken = [i["src"][:100] for i in images if not i["w"]]
        found["images"] = {"count": len(images), "loaded": len(images) - len(broken)}
        if broken:
            problems.append(f"{len(broken)} of {len(images)} images did not load: {broken[:5]}")

        # The Colab launch button: this chapter's notebook on branch main of the repository.
        colab = page.locator(".dropdown-launch-buttons a[href*='colab.research.google.com']")
        hrefs = [colab.nth(i).get_attribute("href") for i in range(colab.count())]
        found["colab"] = hrefs
        if is_notebook:
            if hrefs != [colab_url(docname)]:
                problems.append(f"Colab launch link(s) {hrefs}, expected [{colab_url(docname)}]")
            else:
                page.locator(".dropdown-launch-buttons button.dropdown-toggle").click()
                if not colab.first.is_visible():
                    problems.append("the launch menu opened, but its Colab link is not visible")
                page.keyboard.press("Escape")

        # Exercise solutions (sphinx-exercise `:class: dropdown`): hidden, then shown on click.
        not_dropdown = page.locator(".solution:not(.dropdown)").count()
        if not_dropdown:
            problems.append(f"{not_dropdown} exercise solutions not in a dropdown (`:class: dropdown`)")
        solutions = page.locator(".solution.dropdown")
        opened = 0
        for i in range(solutions.count()):
            solution = solutions.nth(i)
            content = solution.locator(":scope > :not(.admonition-title)").first
            title = solution.locator(".admonition-title").first.inner_text().strip()
            if content.is_visible():
                problems.append(f"solution '{title}' is visible before it is opened")
                continue
            solution.locator(".toggle-button").first.click()
            try:
                content.wait_for(state="visible", timeout=5_000)
                opened += 1
            except Exception:  # noqa: BLE001 - reported as a problem below
                problems.append(f"solution '{title}' did not open on click")
        found["solutions_opened"] = f"{opened}/{solutions.count()}"

        # Sticky header and sidebars are drawn where the window is scrolled to; focus shows the skip link.
        page.evaluate("() => { document.activeElement && document.activeElement.blur(); window.scrollTo(0, 0);"
                      " return document.fonts.ready.then(() => true); }")
        shot = folder / (docname.replace("/", "__") + ".png")
        page.screenshot(path=str(shot), full_page=True)  # with the solutions open
        found["screenshot"] = str(shot)
    except Exception as err:  # noqa: BLE001 - a timeout says little alone: report it with the page's log
        problems.append(f"stopped early: {type(err).__name__}: {str(err).splitlines()[0]}")
    finally:
        found.update(errors=log.errors, known_upstream=log.upstream, external_aborted=log.external,
                     cdn_served=len(log.cdn), integrity_dropped=log.sri_dropped)
        summary[docname] = found
        context.close()

    if log.missing_assets:
        problems.append("CDN files with no local npm copy: " + "; ".join(log.missing_assets))
    problems += log.errors
    assert not problems, f"{docname}:\n  " + "\n  ".join(problems)


def test_toc_pages_cover_every_chapter():
    """The page list comes from _toc.yml; every chapter notebook is in it (new chapters get tested)."""
    for notebook in (ROOT / "chapters").glob("*.ipynb"):
        assert f"chapters/{notebook.stem}" in PAGES
    assert {"intro", "how_to_use", "key_equations", "bibliography"} <= set(PAGES)


# --- the page fits its column -------------------------------------------------------------

WIDTHS = {"desktop": 1280, "phone": 390}

# What overflows, measured in the page. Code and printed output wrap (_static/book.css), so at
# any width nothing may scroll sideways; at desktop width a code line must also fit without
# wrapping (the 76-character limit of test_repository.py is what makes that true). A display
# equation must fit the column at desktop width; on a phone it may scroll inside itself
# (MathJax's container has overflow-x: auto), never the page.
_FITS_JS = """(desktop) => {
  const article = document.querySelector('article.bd-article') || document.querySelector('article');
  const col = article.getBoundingClientRect();
  // inside a closed <details> (a folded cell) nothing is shown
  const shown = e => e.offsetParent !== null && e.getClientRects().length > 0
    && !e.closest('details:not([open])');
  const wide = e => e.scrollWidth > e.clientWidth + 1;
  const unwrappedWide = e => { const old = e.style.whiteSpace; e.style.whiteSpace = 'pre';
    const w = wide(e); e.style.whiteSpace = old; return w; };
  const outside = e => { const r = e.getBoundingClientRect();
    return r.width > 0 && (r.right > col.right + 1 || r.left < col.left - 1); };
  const label = e => (e.textContent || e.tagName).trim().replace(/\\s+/g, ' ').slice(0, 60);
  const over = {code: [], output: [], equation: [], page: []};
  for (const e of article.querySelectorAll('div.highlight pre')) {
    if (!shown(e) || e.closest('.cell_output')) continue;
    // printed text quoted in the prose (```text) may wrap, like a cell's output
    const quoted = e.closest('.highlight-text, .highlight-none');
    if (wide(e) || outside(e) || (desktop && !quoted && unwrappedWide(e))) over.code.push(label(e));
  }
  for (const e of article.querySelectorAll('.cell_output pre, .cell_output .output, .cell_output table, .cell_output img')) {
    if (shown(e) && (wide(e) || outside(e))) over.output.push(label(e));
  }
  for (const e of article.querySelectorAll('mjx-container[display="true"]')) {
    if (!shown(e)) continue;
    const scrolls = ['auto', 'scroll'].includes(getComputedStyle(e).overflowX);
    if (outside(e) || (wide(e) && (desktop || !scrolls)))
      over.equation.push(label(e.closest('div.math') || e).slice(0, 40) + ` (${e.scrollWidth} px in ${e.clientWidth} px)`);
  }
  const doc = document.documentElement;
  if (doc.scrollWidth > doc.clientWidth + 1) {
    const culprits = [...article.querySelectorAll('*')].filter(e => shown(e)
        && e.getBoundingClientRect().right > doc.clientWidth + 1 && !e.closest('mjx-container[display="true"]'))
      .slice(0, 3).map(label);
    over.page.push(`the page is ${doc.scrollWidth} px wide in a ${doc.clientWidth} px window: ${culprits.join(' | ')}`);
  }
  let code = 0;
  for (const e of article.querySelectorAll('.cell_input')) if (shown(e)) code += e.getBoundingClientRect().height;
  return {height: doc.scrollHeight, code_share: Math.round(1000 * code / doc.scrollHeight) / 1000, overflow: over};
}"""


@pytest.mark.parametrize("device", list(WIDTHS))
@pytest.mark.parametrize("docname", PAGES)
def test_page_fits(docname, device, browser, server, book_html, screenshot_dir):
    """Nothing is wider than its box at 1280 and 390 px; records height and visible code."""
    folder, summary = screenshot_dir
    width = WIDTHS[device]
    has_math = bool(re.search(r'class="math[ "]', (book_html / f"{docname}.html").read_text()))
    log = PageLog(server)
    context = browser.new_context(viewport={"width": width, "height": 900}, service_workers="block")
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.route("**/*", log.route)
    try:
        page.goto(server + f"{docname}.html", wait_until="load")
        if has_math:
            page.wait_for_function("() => window.MathJax && MathJax.startup && MathJax.startup.promise")
            page.evaluate("() => MathJax.startup.promise.then(() => true)")
        page.evaluate("() => document.fonts.ready.then(() => true)")
        found = page.evaluate(_FITS_JS, width >= 1000)
        stem = docname.replace("/", "__")
        if device == "phone":
            page.screenshot(path=str(folder / f"{stem}@{width}.png"), full_page=True)
        else:
            # the dark theme: figures keep their white background, text stays readable
            page.evaluate("() => { document.documentElement.dataset.theme = 'dark';"
                          " document.documentElement.dataset.mode = 'dark'; }")
            page.wait_for_timeout(500)   # let the theme's colours settle before the picture
            page.screenshot(path=str(folder / f"{stem}@{width}-dark.png"), full_page=True)
    finally:
        context.close()
    summary[f"{docname}@{width}"] = found
    problems = [f"{kind}: {item}" for kind, items in found["overflow"].items() for item in items]
    assert not problems, f"{docname} at {width} px: {len(problems)} wider than their box:\n  " + \
        "\n  ".join(problems[:12])
