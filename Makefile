# imgcache developer entry points. `make serve` and `make test` are the README's quick start.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=
SUITE ?= hits_storms
PROMTOOL_DIR ?= $(HOME)/.cache/imgcache/promtool

.PHONY: setup serve demo test lint system-deps tier-deps glance-venv bench clean systemd-verify \
	promtool

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

## setup: the project's virtualenv with imgcache and its test tools
setup: $(BIN)/.installed

## serve: run imgcache on 127.0.0.1:9293 in front of Glance at 127.0.0.1:9292 (ARGS="--upstream URL ...")
serve: setup
	$(BIN)/imgcache serve --cache-dir ./var/cache --admin-socket ./var/imgcache.sock $(ARGS)

## demo: a boot storm through imgcache against a throwaway Glance stand-in
demo: setup
	$(BIN)/imgcache demo $(ARGS)

## system-deps: curl and strace, which the process tests drive and watch imgcache with,
## tinyproxy (the binary only, no service), the forward proxy of tests/test_upstream_proxy.py,
## and iproute2's ip, which builds the emulated link of tests/netlink
system-deps:
	@command -v curl >/dev/null && command -v strace >/dev/null \
	  && command -v tinyproxy >/dev/null && command -v ip >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq \
	    && apt-get install -y -qq curl strace tinyproxy-bin iproute2; \
	  else echo "install curl, strace, tinyproxy and iproute2" \
	    "(apt-get install curl strace tinyproxy-bin iproute2)" >&2; exit 1; fi; }

## tier-deps: the shared tier's engines, Apache Traffic Server and Squid, from Debian (their
## services kept from starting while they install: policy-rc.d), and iproute2 for the
## network namespaces of tests/test_fleet.py
tier-deps:
	@command -v traffic_server >/dev/null && { command -v squid || test -x /usr/sbin/squid; } \
	  >/dev/null && command -v ip >/dev/null && command -v tc >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    added=; if [ ! -e /usr/sbin/policy-rc.d ]; then \
	      printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d \
	      && chmod 755 /usr/sbin/policy-rc.d && added=1; fi; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      trafficserver squid iproute2; rc=$$?; \
	    if [ -n "$$added" ]; then rm -f /usr/sbin/policy-rc.d; fi; exit $$rc; \
	  else echo "install trafficserver, squid and iproute2" \
	    "(apt-get install trafficserver squid iproute2)" >&2; exit 1; fi; }

## systemd-deps: systemd-analyze, which checks systemd/imgcache.service (Debian's systemd;
## installing it in a container without systemd running starts nothing)
systemd-deps:
	@command -v systemd-analyze >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq \
	    && apt-get install -y -qq --no-install-recommends systemd; \
	  else echo "install systemd-analyze (apt-get install systemd)" >&2; exit 1; fi; }

## systemd-verify: systemd-analyze verify systemd/imgcache.service, its ExecStart pointed at
## this venv's imgcache (verify rejects a missing binary; it only warns, exit 0, on unknown
## keys and bad values, so any output fails too)
systemd-verify: setup
	@if ! command -v systemd-analyze >/dev/null; then \
	  echo "systemd-verify: systemd-analyze not found, the unit was NOT checked" \
	    "(make systemd-deps installs it)" >&2; exit 1; fi; \
	tmp=$$(mktemp -d); \
	sed 's#/opt/imgcache/bin/imgcache#$(abspath $(BIN))/imgcache#' systemd/imgcache.service \
	  > $$tmp/imgcache.service; \
	out=$$(systemd-analyze verify $$tmp/imgcache.service 2>&1); rc=$$?; rm -rf $$tmp; \
	if [ $$rc != 0 ] || [ -n "$$out" ]; then printf '%s\n' "$$out" >&2; \
	  echo "systemd-verify: systemd/imgcache.service REJECTED" >&2; exit 1; fi; \
	echo "systemd-verify: systemd/imgcache.service OK"

## promtool: Prometheus's rule checker for config/prometheus-rules.yml, taken out of Debian's
## prometheus package (a 19 MB download) into $(PROMTOOL_DIR) without installing the package,
## which would start a Prometheus server and pull in node-exporter
promtool:
	@command -v promtool >/dev/null || [ -x $(PROMTOOL_DIR)/promtool ] || { \
	  tmp=$$(mktemp -d) && cd $$tmp \
	  && { apt-get download -qq -o APT::Sandbox::User=root prometheus 2>/dev/null \
	       || { apt-get update -qq && apt-get download -qq -o APT::Sandbox::User=root prometheus; }; } \
	  && mkdir -p $(PROMTOOL_DIR) \
	  && dpkg-deb --fsys-tarfile prometheus_*.deb | tar -xO ./usr/bin/promtool > promtool \
	  && chmod 755 promtool && mv promtool $(PROMTOOL_DIR)/promtool; \
	  rc=$$?; cd / && rm -rf $$tmp; exit $$rc; }

## glance-venv: a separate virtualenv with a real glance-api 33 for tests/test_real_glance.py
glance-venv:
	bash tests/glance/setup-venv.sh

## lint: ruff over the package, tests and benchmarks
lint: setup
	$(BIN)/ruff check imgcache tests bench

## test: everything the tests need, then lint and the whole test suite
test: setup system-deps systemd-deps tier-deps promtool glance-venv lint
	$(BIN)/python -m pytest -p no:cacheprovider $(ARGS)

## bench: a benchmark suite, bench/$(SUITE)/run.py (default hits_storms: hit throughput against
## nginx and a cold boot storm; SUITE=peers, fleet, sizing; see bench/README.md)
bench: setup
	$(BIN)/python -m bench.$(SUITE).run $(ARGS)

clean:
	rm -rf $(VENV) var bench/work
