# imgcache developer entry points. `make serve` and `make test` are the README's quick start.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: setup serve demo test lint system-deps glance-venv bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

## setup: the project's virtualenv with imgcache and its test tools
setup: $(BIN)/.installed

## serve: run imgcache on 127.0.0.1:9293 in front of Glance at 127.0.0.1:9292 (ARGS="--upstream URL ...")
serve: setup
	$(BIN)/imgcache serve --cache-dir ./var/cache $(ARGS)

## demo: a boot storm through imgcache against a throwaway Glance stand-in
demo: setup
	$(BIN)/imgcache demo $(ARGS)

## system-deps: curl and strace, which the process tests drive and watch imgcache with
system-deps:
	@command -v curl >/dev/null && command -v strace >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq curl strace; \
	  else echo "install curl and strace (apt-get install curl strace)" >&2; exit 1; fi; }

## glance-venv: a separate virtualenv with a real glance-api 33 for tests/test_real_glance.py
glance-venv:
	bash tests/glance/setup-venv.sh

## lint: ruff over the package, tests and benchmarks
lint: setup
	$(BIN)/ruff check imgcache tests bench

## test: everything the tests need, then lint and the whole test suite
test: setup system-deps glance-venv lint
	$(BIN)/python -m pytest -p no:cacheprovider $(ARGS)

## bench: hit throughput against nginx and a cold boot storm (see bench/README.md)
bench: setup
	$(BIN)/python bench/run.py $(ARGS)

clean:
	rm -rf $(VENV) var bench/work
