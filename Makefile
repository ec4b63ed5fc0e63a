# The two commands of the README: `make quickstart` and `make test`. Both set themselves up.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup quickstart test lint clean

setup:
	bash scripts/setup.sh

quickstart:
	EXTRAS= WITH_REFERENCE=0 bash scripts/setup.sh
	$(VENV)/bin/atlasformer quickstart --output quickstart_output

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q --timeout 900 --durations 15

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf quickstart_output .pytest_cache
