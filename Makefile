PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= var/librarian.ini

.PHONY: serve test install clean screenshots

# The virtualenv, (re)installed when the requirements change.
$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements-dev.txt
	$(BIN)/pip install -q -e .
	touch $@

install: $(VENV)/.installed

$(CONFIG): | $(VENV)/.installed
	$(BIN)/python librarian.py init-config $(CONFIG)

# Set up (first time) and run a server on SQLite with a local store under ./var/.
serve: install $(CONFIG)
	$(BIN)/python librarian.py migrate --config $(CONFIG)
	$(BIN)/python librarian.py show-admin --config $(CONFIG)
	$(BIN)/python librarian.py serve --config $(CONFIG)

# The whole test suite, on SQLite and on PostgreSQL, two tests at a time
# (each makes its own databases, folders and ports); the slowest are listed.
test: install
	$(BIN)/python -m pytest -q -n 2 --durations=15 $(PYTEST_ARGS)

# The README's screenshots, taken by the browser test (on SQLite).
screenshots: install
	LIBRARIAN_SCREENSHOTS=$(CURDIR)/docs/screenshots $(BIN)/python -m pytest -q \
		tests/test_browser.py -k sqlite

clean:
	rm -rf $(VENV) .pytest_cache
