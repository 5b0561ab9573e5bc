# vecpipe developer tasks. Everything installs into .venv; nothing needs network beyond PyPI.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
EXTRAS ?= test,onnx,openvino,ray
PYTEST_ARGS ?=

.PHONY: install test test-fast bench man demo clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt "$(TORCH)"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	touch $@

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Everything but the tests marked slow (real model, ONNX, OpenVINO, Ray, NFCorpus, long subprocess
# pipelines and signals): the edit loop, under a minute.
test-fast: install
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

bench: install
	$(BIN)/python bench/startup.py

man: install
	$(BIN)/python -m vecpipe.cli.docgen .

# The main job end to end on the bundled model: a corpus every machine has (the docstrings of
# Python's standard library), embedded, indexed, and searched with a few questions.
demo: install
	mkdir -p demo
	$(BIN)/python bench/demo_corpus.py -o demo/stdlib.jsonl
	$(BIN)/python bench/demo_corpus.py --queries demo/queries.jsonl
	$(BIN)/vecpipe embed demo/stdlib.jsonl --text-field text | $(BIN)/vecpipe index -o demo/idx --fields title
	$(BIN)/vecpipe search demo/idx demo/queries.jsonl -k 3 --fields title --output-format jsonl \
		| $(BIN)/python bench/demo_corpus.py --show

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache demo
