# The two commands of the README. Each installs what it needs first (pip, idempotent).
PYTHON ?= python3
PIP = $(PYTHON) -m pip install -q --disable-pip-version-check

.PHONY: book test install

install:
	$(PIP) -r requirements.txt

# Build the rendered book from the committed notebook outputs: _build/html/index.html
book: install
	$(PYTHON) -c "from jupyter_book.cli.main import main; main()" build . -W -n --keep-going
	@echo "The book is at $(CURDIR)/_build/html/index.html"

# Every test: ddpm_lib's unit tests, the chapters under nbval (smoke profile), the book build (-W).
test: install
	DDPM_PROFILE=smoke $(PYTHON) -m pytest tests chapters --nbval --nbval-sanitize-with tests/nbval_sanitize.cfg --nbval-current-env -p no:cacheprovider
