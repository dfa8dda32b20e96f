# The two commands of the README. Each installs what it needs first (pip, idempotent).
PYTHON ?= python3
PIP = $(PYTHON) -m pip install -q --disable-pip-version-check
# tests/test_browser.py drives Debian's Chromium (apt-get install chromium) with playwright;
# never `playwright install`, which downloads a browser of its own.
PLAYWRIGHT = playwright==1.65.2
# Where the browser test leaves a full-page screenshot of every page (and summary.json).
DDPM_SCREENSHOTS ?= $(CURDIR)/_build/screenshots

.PHONY: book test install browser assignments publish

install:
	$(PIP) -r requirements.txt

# What the browser test needs besides Chromium: playwright, and the files the book loads from
# CDNs (MathJax, require.js, the widget manager) as npm packages (needs npm; skipped without it).
# Without them that test skips, unless DDPM_REQUIRE_BROWSER=1 (CI), where it fails.
browser:
	$(PIP) $(PLAYWRIGHT)
	-$(PYTHON) tests/browser_assets.py

# Build the rendered book from the committed notebook outputs: _build/html/index.html
book: install
	$(PYTHON) -c "from jupyter_book.cli.main import main; main()" build . -W -n --keep-going
	@echo "The book is at $(CURDIR)/_build/html/index.html"

# Every test: ddpm_lib's unit tests, the chapters under nbval (smoke profile), the book build (-W),
# and every page of the book in headless Chromium (screenshots in $(DDPM_SCREENSHOTS)).
test: install browser
	DDPM_PROFILE=smoke DDPM_SCREENSHOTS="$(DDPM_SCREENSHOTS)" $(PYTHON) -m pytest tests chapters --nbval --nbval-sanitize-with tests/nbval_sanitize.cfg --nbval-current-env -p no:cacheprovider

# Student notebooks and grading bundles of the assignments in assignments/dist/ (see instructors.md).
assignments: install
	$(PYTHON) scripts/make_assignments.py

# Publish _build/html to the gh-pages branch (for forks without GitHub Actions; the workflow in
# .github/workflows/book.yml does the same on every push to main).
publish: book
	$(PIP) ghp-import==2.1.0
	$(PYTHON) -m ghp_import -n -p -f _build/html
