# deploykit developer tasks. `make demo` and `make test` are the two commands in the README.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEMO_DIR ?= demo-out
PORT ?= 5057

# `make test-lowest`: the core package at the lowest versions pyproject.toml allows (uv's lowest-direct: each
# core dependency at its lower bound, their own dependencies at the newest they admit), without torch, on the
# tests of what serve, predict and inspect use. Those tests take their models from DEPLOYKIT_TEST_MODELS,
# exported beforehand by the main venv.
LOWEST_VENV ?= .venv-lowest
LOWEST_MODELS := $(LOWEST_VENV)/models
UV := $(VENV)/bin/uv
LOWEST_TESTS := tests/serve tests/test_predict.py tests/test_client.py tests/test_images.py tests/test_card.py \
	tests/test_runtime.py tests/test_inspect.py
# In those files, the tests that need torch, the test extra's V2 clients (tritonclient, kserve) or Chromium:
LOWEST_DESELECT := \
	tests/serve/test_page.py \
	tests/serve/test_v2.py::test_tritonclient \
	tests/serve/test_v2.py::test_kserve_client \
	tests/serve/test_v2.py::test_v2_and_rest_agree \
	tests/serve/test_routes.py::test_static_batch_model \
	tests/test_predict.py::test_static_batch_model_locally_and_over_v2 \
	tests/test_predict.py::test_exact_decode_is_torchvisions_pipeline_locally_and_over_v2 \
	tests/test_images.py::test_preprocess_matches_torchvision \
	tests/test_images.py::test_extreme_aspect_ratio_resizes_only_the_crop \
	tests/test_images.py::test_preprocess_after_decoding_matches_torchvision_on_a_jpeg \
	tests/test_images.py::test_exact_mode_is_todays_decode_and_torchvisions_pipeline

.PHONY: install browser demo test test-lowest lint typecheck bench clean

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

$(UV): $(VENV)/.installed
	$(PIP) install --quiet uv
	touch $@

# A new venv each time: uv keeps whatever already satisfies a requirement, however new. Wheels only, as users
# get them. The test tools come second, constrained to the versions just installed, so they move none of them.
test-lowest: $(UV)
	rm -rf $(LOWEST_VENV)
	$(PYTHON) -m venv --without-pip $(LOWEST_VENV)
	$(UV) pip install --quiet --python $(LOWEST_VENV)/bin/python --resolution lowest-direct \
		--only-binary :all: -e .
	$(UV) pip freeze --quiet --python $(LOWEST_VENV)/bin/python --exclude-editable > $(LOWEST_VENV)/lowest.txt
	$(UV) pip install --quiet --python $(LOWEST_VENV)/bin/python -c $(LOWEST_VENV)/lowest.txt \
		'pytest>=8' 'pytest-timeout>=2.3'
	@echo "Lowest versions:" $$(cat $(LOWEST_VENV)/lowest.txt)
	mkdir -p $(LOWEST_MODELS)
	$(PY) -m deploykit export examples/shapes/model.py:build -o $(LOWEST_MODELS)/shapes.onnx
	$(PY) -m deploykit export resnet18 --weights none -o $(LOWEST_MODELS)/resnet18.onnx
	$(LOWEST_VENV)/bin/deploykit --help > /dev/null
	$(LOWEST_VENV)/bin/deploykit serve --help > /dev/null
	$(LOWEST_VENV)/bin/deploykit predict --help > /dev/null
	$(LOWEST_VENV)/bin/deploykit inspect $(LOWEST_MODELS)/resnet18.onnx > /dev/null
	$(LOWEST_VENV)/bin/deploykit verify $(LOWEST_MODELS)/shapes.onnx > /dev/null
	DEPLOYKIT_TEST_MODELS=$(CURDIR)/$(LOWEST_MODELS) $(LOWEST_VENV)/bin/python -m pytest -q $(LOWEST_TESTS) \
		$(addprefix --deselect ,$(LOWEST_DESELECT))

lint: install
	$(PY) -m ruff check deploykit tests benchmarks examples

typecheck: install
	$(PY) -m mypy deploykit

bench: install
	$(PY) benchmarks/bench_serve.py --image-size small,phone --repeat 3 --markdown
	$(PY) benchmarks/bench_models.py
	$(PY) benchmarks/bench_predict.py

clean:
	rm -rf $(VENV) $(LOWEST_VENV) $(DEMO_DIR) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
