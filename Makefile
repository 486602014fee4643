# deploykit developer tasks. `make demo` and `make test` are the two commands in the README.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEMO_DIR ?= demo-out
PORT ?= 5057

.PHONY: install browser demo test lint typecheck bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[all]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) examples/demo.py --out $(DEMO_DIR) --port $(PORT)

# The web page tests drive a real headless Chromium: installed with apt-get where it is missing.
browser:
	scripts/ensure-chromium

test: install browser
	$(PY) -m pytest -q
	$(PY) -m ruff check deploykit tests benchmarks examples
	$(PY) -m mypy deploykit

lint: install
	$(PY) -m ruff check deploykit tests benchmarks examples

typecheck: install
	$(PY) -m mypy deploykit

bench: install
	$(PY) benchmarks/bench_serve.py --image-size small,phone --repeat 3 --markdown
	$(PY) benchmarks/bench_models.py
	$(PY) benchmarks/bench_predict.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
