# Two commands: `make demo` and `make test`. Each installs what it needs on a fresh Debian 12
# machine (apt: mosquitto, prometheus; pip: a venv at .venv; Maven: the Kafka and Apicurio jars, cached in
# ~/.m2) and starts what it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test lint unit integration bench bench-faust up down status system-deps clean vendor-echarts

# The main job on the embedded default: a simulated fleet through the whole pipeline; the stack
# stays up afterwards (`fleet sql`, `fleet status`; `fleet down` stops it).
DEMO_DEVICES ?= 500
DEMO_DURATION ?= 60
DEMO_REPORT ?= .state/demo-report.html
demo: $(VENV)/.installed system-deps
	$(VENV)/bin/fleet demo --devices $(DEMO_DEVICES) --duration $(DEMO_DURATION) --json \
	  --report $(DEMO_REPORT)
	$(VENV)/bin/fleet status
	@# The stack stays up: where to look (the dashboard; Prometheus too once it runs).
	$(VENV)/bin/fleet dashboard

test: $(VENV)/.installed system-deps lint unit integration

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache

unit: $(VENV)/.installed
	$(VENV)/bin/pytest -q tests/unit

# Integration and e2e tests start their own stack (ports 1xxxx, state in .state/test-stack-10000).
# The 40 slowest tests are listed at the end (where CI time goes).
integration: $(VENV)/.installed system-deps
	$(VENV)/bin/pytest -q -ra --durations=40 tests/integration tests/e2e

up: $(VENV)/.installed system-deps
	$(VENV)/bin/fleet up
down:
	$(VENV)/bin/fleet down
status:
	$(VENV)/bin/fleet status

# Debian packages the platform runs: the broker, and its clients for manual checks.
system-deps:
	@command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || \
	  ($(SUDO) apt-get update -qq && \
	   DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq mosquitto mosquitto-clients)
	@# The broker's subscribe ACL plugin is compiled on `fleet up` (infra/services/mosquitto.py).
	@[ -f /usr/include/mosquitto_plugin.h ] && [ -f /usr/include/mosquitto.h ] && command -v cc >/dev/null || \
	  ($(SUDO) apt-get update -qq && \
	   DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq mosquitto-dev libmosquitto-dev gcc)
	@# Prometheus scrapes the platform's processes (infra/services/prometheus.py); promtool
	@# (same package) checks the generated config and rules in the unit tests.
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || \
	  ($(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq prometheus)
	@command -v mvn >/dev/null || \
	  ($(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq maven)
	@# Headless Chromium: the e2e test loads the fleet dashboard in it (tests/e2e/test_dashboard.py).
	@command -v chromium >/dev/null || \
	  ($(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium)

# pip's cache (~/.cache/pip) keeps wheels for the next clone.
$(VENV)/.installed: pyproject.toml
	[ -x $(VENV)/bin/python ] || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

clean:
	-$(VENV)/bin/fleet down
	rm -rf .state/stack .state/test-stack-*

# Benchmarks on a stack of their own; writes bench/results.json.
bench: $(VENV)/.installed system-deps
	$(VENV)/bin/python -m bench

# The `faust` stage of `make bench` alone: a Faust job beside the kit's transactional loop doing
# the same work, and why the core workers are not Faust agents (writes bench/results.json).
bench-faust: $(VENV)/.installed system-deps
	$(VENV)/bin/python -m bench faust

# The dashboard's chart library, vendored (no CDN: the machines have no internet): the built,
# minified Apache ECharts from npm at a pinned version, with its licence and notice beside it.
ECHARTS_VERSION := 6.1.0
DASHBOARD_STATIC := infra/api/dashboard/static
vendor-echarts:
	@tmp=$$(mktemp -d) && cd $$tmp && npm pack --silent echarts@$(ECHARTS_VERSION) >/dev/null && \
	  tar xzf echarts-$(ECHARTS_VERSION).tgz && cd - >/dev/null && \
	  cp $$tmp/package/dist/echarts.common.min.js $(DASHBOARD_STATIC)/echarts.min.js && \
	  { echo "Apache ECharts $(ECHARTS_VERSION) (npm package echarts@$(ECHARTS_VERSION)," \
	         "dist/echarts.common.min.js), $$(node -p "require('$$tmp/package/package.json').license")"; \
	    echo; cat $$tmp/package/NOTICE; echo; echo; cat $$tmp/package/LICENSE; } \
	    > $(DASHBOARD_STATIC)/ECHARTS-LICENSE.txt && \
	  rm -rf $$tmp && echo "vendored echarts $(ECHARTS_VERSION) into $(DASHBOARD_STATIC)"
