# drover: build, test and demo entry points. `make help` lists the targets.
#
# Builds go to $(CARGO_TARGET_DIR) (default ~/.cache/drover-target, outside the clone, so every
# clone and CI run reuses one build cache). Targets that need RabbitMQ and Postgres start them
# first with scripts/ensure-services.sh (which installs them with apt-get when absent).

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-print-directory

CARGO ?= cargo
CARGO_TARGET_DIR ?= $(HOME)/.cache/drover-target
export CARGO_TARGET_DIR
# The binary `migrate` and `demo` run: the dev-profile build that `make test` also uses
# (dependencies optimised, see Cargo.toml), so a newcomer compiles polars once, not twice.
# `make build` makes the optimised release binary for deployment and benchmarks.
DROVER ?= $(CARGO_TARGET_DIR)/debug/drover

# The services the tests talk to (tests/integration/support.rs, crates/*/tests).
DROVER_TEST_AMQP_URL ?= amqp://guest:guest@127.0.0.1:5672/%2f
DROVER_TEST_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/postgres
export DROVER_TEST_AMQP_URL DROVER_TEST_DATABASE_URL

# Test runner: cargo-nextest when installed (NEXTEST=auto), or force it with NEXTEST=1 / 0.
NEXTEST ?= auto

.PHONY: help services browser build build-dev lint fmt check-deploy deny test test-python test-outage test-cluster migrate demo clean-demo bench bench-lineage bench-dashboard dashboard-screenshots

help: ## list the targets
	@echo 'usage: make <target>   (builds in $(CARGO_TARGET_DIR))'
	@awk -F ':.*## ' '/^[a-z][a-z-]*:.*## / { printf "  %-13s %s\n", $$1, $$2 }' $(firstword $(MAKEFILE_LIST))

services: ## start RabbitMQ and Postgres if needed (installs them with apt-get when absent)
	scripts/ensure-services.sh

browser: ## install Debian's chromium and chromium-driver if missing (the dashboard's browser tests)
	scripts/ensure-browser.sh

build: ## build the release binary (cargo build --release -p drover)
	$(CARGO) build --release -p drover

lint: ## cargo fmt --check and clippy -D warnings on every target
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt: ## format the workspace (cargo fmt)
	$(CARGO) fmt --all

check-deploy: ## static checks of deploy/ (systemd, Docker, compose, Kubernetes)
	scripts/check-deploy.sh

# scripts/deny.sh installs cargo-deny on first use (cargo install --locked, into ~/.cargo/bin)
# and fetches the advisory database from GitHub; without access to GitHub it checks against
# the copy an earlier run left in ~/.cargo/advisory-dbs, with a warning (DENY_STRICT=1 fails
# instead). See docs/security.md.
deny: ## audit dependencies: advisories, licenses, bans (duplicates), sources (deny.toml)
	CARGO='$(CARGO)' scripts/deny.sh

test: services browser ## start the services, lint, check deploy/, run every test against them
	$(MAKE) lint
	$(MAKE) check-deploy
	$(MAKE) deny
	@# The exec pipeline's test children (tests/exec/*.py) run with this venv's python.
	@DROVER_TEST_PYTHON="$$(scripts/ensure-python.sh | tail -n 1)"; export DROVER_TEST_PYTHON; \
	if [[ $(NEXTEST) == 1 ]] || { [[ $(NEXTEST) == auto ]] && $(CARGO) nextest --version >/dev/null 2>&1; }; then \
	    echo '$(CARGO) nextest run --workspace && $(CARGO) test --workspace --doc'; \
	    $(CARGO) nextest run --workspace; \
	    $(CARGO) test --workspace --doc; \
	else \
	    echo '$(CARGO) test --workspace'; \
	    $(CARGO) test --workspace; \
	fi
	$(MAKE) test-python
	$(MAKE) test-outage

test-python: services build-dev ## the Python client (clients/python): ruff, mypy --strict, pytest against the services
	@PY=$$(scripts/ensure-python.sh); cd clients/python; \
	echo "ruff, mypy --strict, pytest with $$PY"; \
	"$$PY" -m ruff check src tests examples; \
	"$$PY" -m ruff format --check src tests examples; \
	"$$PY" -m mypy --strict src tests examples; \
	rc=0; DROVER_BIN='$(DROVER)' "$$PY" -m pytest -q tests || rc=$$?; \
	if [[ $$rc == 5 ]]; then echo 'pytest collected no tests: failing' >&2; exit 1; fi; \
	exit $$rc

test-outage: services ## the outage tests: they stop the shared RabbitMQ/Postgres, so they run alone
	@# --workspace, not -p drover: the feature set of `make test`'s build (see build-dev).
	$(CARGO) test --workspace --test integration outage:: -- --ignored --test-threads=1

test-cluster: services ## three private RabbitMQ nodes (ports 5731-5733) clustered; a worker fails over when its node stops
	@# --workspace, not -p drover: the same feature set as `make test`'s build, so polars is
	@# not compiled a second time.
	$(CARGO) test --workspace --test integration cluster:: -- --ignored --test-threads=1
	scripts/ensure-services.sh

build-dev: ## build the dev-profile binary that demo and migrate run, with every test target
	@# Every target, not just -p drover: a build without the dev-dependencies resolves other
	@# features for shared crates (syn's "fold", through the browser tests' dependencies),
	@# which rebuilds polars and everything else a second time; this way demo, the test run and
	@# test-python share one build.
	$(CARGO) build --workspace --all-targets

migrate: build-dev ## create the ledger database if absent and apply migrations (drover migrate)
	$(DROVER) migrate

demo: services build-dev ## start the services, run a worker and real jobs, show the ledger
	DROVER='$(DROVER)' scripts/demo.sh

clean-demo: ## remove the demo's data and output (./demo-data)
	rm -rf demo-data

dashboard-screenshots: services browser ## screenshots of the dashboard's pages into docs/dashboard/*.png (headless Chromium)
	DROVER_SCREENSHOT_DIR=$(CURDIR)/docs/dashboard $(CARGO) test -p drover --test integration dashboard::screenshots -- --ignored --exact

bench-dashboard: services build-dev ## time the dashboard's pages on a throwaway ledger of 1,000,000 jobs (bench/dashboard.sh; updates docs/benchmarks.md)
	bench/dashboard.sh $(DROVER)

bench-lineage: ## what input fingerprinting costs a 1M-row payroll job, release build (bench/lineage.sh; no services needed)
	$(CARGO) build --release -p drover
	bench/lineage.sh $(CARGO_TARGET_DIR)/release/drover

bench: services ## build the release binary and run the benchmarks, a Celery peer among them (bench/run.sh; installs its Python deps in bench/.venv; rewrites docs/benchmarks.md)
	$(CARGO) build --release -p drover
	bench/run.sh $(CARGO_TARGET_DIR)/release/drover
