VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip --disable-pip-version-check -q
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=
# The torch-free environment of `make test-lite`, and the bundles its tests read (tests/bundles.py).
LITE    ?= .venv-lite
LITE_STAMP := $(LITE)/.installed
TEST_BUNDLES ?= $(CURDIR)/.test-bundles
LITE_TESTS := tests/runtime tests/serve tests/engine

.PHONY: demo test test-lite lint docs clean

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP) install -c constraints.txt torch==2.13.0
	$(PIP) install -c constraints.txt -e '.[export,cpu,dev,serve,ray,plot]'
	touch $(STAMP)

# A device's install, `pip install gpt2-edge[cpu,serve]` (no torch, no onnx), and the test tools; onnx
# only for tests/engine/engine_fakes.py, which runs a bundle's ONNX graph as a fake TensorRT engine.
$(LITE_STAMP): pyproject.toml
	python3 -m venv $(LITE)
	$(LITE)/bin/python -m pip --disable-pip-version-check -q install -e '.[cpu,serve]' pytest httpx openai onnx
	touch $(LITE_STAMP)

demo: $(STAMP)
	$(VENV)/bin/gpt2-edge demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# runtime/, serve/ and engine/ tested without torch (as .ci/run does): the torch venv makes the bundles
# (only those missing or made from other sources), the torch-free venv runs the tests on them.
test-lite: $(STAMP) $(LITE_STAMP)
	GPT2_EDGE_TEST_BUNDLES=$(TEST_BUNDLES) $(PY) -m tests.bundles
	$(LITE)/bin/python -c 'import importlib.util as u, sys; sys.exit("torch is importable in $(LITE)" if u.find_spec("torch") else 0)'
	GPT2_EDGE_TEST_BUNDLES=$(TEST_BUNDLES) GPT2_EDGE_TEST_BUNDLES_STRICT=1 $(LITE)/bin/python -m pytest $(LITE_TESTS) -rs $(PYTEST_ARGS)

# The docs build strictly (a broken link, anchor or API reference fails); their examples run in `make test`.
lint: $(STAMP)
	$(VENV)/bin/ruff check gpt2_edge tests benchmarks conftest.py
	$(VENV)/bin/lint-imports --no-cache
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

# The documentation site (MkDocs, mkdocs-material, mkdocstrings) into build/site/.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV) $(LITE) $(TEST_BUNDLES) build *.egg-info .pytest_cache .ruff_cache
