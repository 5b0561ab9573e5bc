# vecpipe developer tasks. Everything installs into .venv; nothing needs network beyond PyPI.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
EXTRAS ?= test,onnx,openvino,ray,eval,train
PYTEST_ARGS ?=

.PHONY: install install-shell test test-fast bench man demo clean

install: $(VENV)/.installed install-shell

# Completions and man pages where the shells and man look inside the venv (an editable install
# places no data-files): man finds $(VENV)/share/man from PATH once the venv is active.
SHARE := $(VENV)/share
install-shell:
	mkdir -p $(SHARE)/man/man1 $(SHARE)/bash-completion/completions \
		$(SHARE)/zsh/site-functions $(SHARE)/fish/vendor_completions.d
	rm -f $(SHARE)/man/man1/vecpipe*.1
	cp man/vecpipe*.1 $(SHARE)/man/man1/
	cp completions/vecpipe.bash $(SHARE)/bash-completion/completions/vecpipe
	cp completions/_vecpipe $(SHARE)/zsh/site-functions/_vecpipe
	cp completions/vecpipe.fish $(SHARE)/fish/vendor_completions.d/vecpipe.fish

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
# Python's standard library, title and text embedded together), indexed, searched by text and by
# example ("more like this": stored vectors, no model call), then as a 32x smaller binary index
# searched exactly and rescored with the kept floats. The cache makes a second run quick.
DEMO_QUERIES := --query "parse command-line arguments" \
	--query "run a shell command and capture its output" \
	--query "make a temporary directory that is deleted afterwards"
demo: install
	mkdir -p demo
	$(BIN)/python bench/demo_corpus.py -o demo/stdlib.jsonl
	$(BIN)/vecpipe embed demo/stdlib.jsonl --text-field title --text-field text \
		--cache demo/cache -o demo/stdlib.arrow
	$(BIN)/vecpipe index demo/stdlib.arrow -o demo/idx --fields text
	@echo "== search by text: the queries embedded with the model the index records"
	$(BIN)/vecpipe search demo/idx $(DEMO_QUERIES) -k 3 --fields text --output-format table
	@echo "== more like json.loads: its stored vector is the query, no model call"
	$(BIN)/vecpipe search demo/idx --like json.loads -k 3 --fields text --output-format table
	@echo "== 1 bit a dimension (32x smaller), searched exactly, the top 30 rescored in float"
	$(BIN)/vecpipe index demo/stdlib.arrow --dtype b1 --flat --keep-vectors -o demo/idx-b1 \
		--fields text
	$(BIN)/vecpipe search demo/idx-b1 $(DEMO_QUERIES) -k 3 --rescore 10 --fields text \
		--output-format table

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache demo
