# pgkeep — the README's commands live here.
#   make up         build pgkeep and bring up the local secure cluster
#   make test       everything: lint, unit, simulation, real-component tests
#   make test-fast  unit + simulation tests only (no real components)
#   make down       stop the local cluster

SHELL := /bin/bash
DIR ?= /var/lib/pgkeep-demo
CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

# Debian packages pgkeep's build, tests and local cluster need (slapd: the LDAP test). nginx is for
# benchmarks only.
PACKAGES := postgresql-15 postgresql-15-pgaudit etcd-server etcd-client pgbackrest haproxy \
            protobuf-compiler libprotobuf-dev patroni apache2-utils nftables gcc libc6-dev \
            slapd ldap-utils

.PHONY: deps build up down test test-fast lint sim

deps:
	@bash scripts/install-deps.sh $(PACKAGES)

build: deps
	$(CARGO) build --locked

up: build
	target/debug/pgkeep up --dir $(DIR)

down:
	target/debug/pgkeep down --dir $(DIR) $(if $(PURGE),--purge)

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

test-fast: deps
	$(CARGO) nextest run --locked -p pgkeep-core -p pgkeep-sim -p pgkeep --lib --bins

test: deps lint
	$(CARGO) nextest run --locked --workspace --no-tests=warn

SEEDS ?= 100000
sim: deps
	$(CARGO) run --locked -p pgkeep-sim --bin pgkeep-sim -- --seeds $(SEEDS)

# Benchmark harness (bench/README.md): pgkeep vs Patroni failover, switchover, REST API and
# resources, as root.
#   make bench                      10 trials per product and scenario, aggressive timings
#   make bench TRIALS=1             quick run (a few minutes)
#   make bench TIMINGS=aggressive,default SCENARIOS=failover BENCH_ARGS='--kill-phase-ms 500'
#   make bench SYNC=1               the same with synchronous_mode: true for both products
#   make bench HAPROXY=1            failover and switchover with the writer going through HAProxy
#                                   (one per product, the same configuration for both)
#   make bench SCENARIOS=rest       REST API (ab, next to nginx) + idle memory/CPU, release build
#   make bench PROFILE=release      pgkeep's release build (default: debug, or release with rest)
TRIALS ?= 10
SCENARIOS ?= failover,switchover
TIMINGS ?= aggressive
SYNC ?=
HAPROXY ?=
PROFILE ?= $(if $(findstring rest,$(SCENARIOS)),release,debug)
BENCH_ARGS ?=
.PHONY: bench
bench: deps
	$(if $(findstring rest,$(SCENARIOS)),@bash scripts/install-deps.sh nginx)
	$(CARGO) build --locked -p pgkeep $(if $(filter release,$(PROFILE)),--release)
	$(CARGO) build --locked --release -p pgkeep-bench
	target/release/pgkeep-bench --pgkeep-bin target/$(PROFILE)/pgkeep --trials $(TRIALS) \
		--scenarios $(SCENARIOS) --timings $(TIMINGS) $(if $(filter 1 yes true,$(SYNC)),--sync) \
		$(if $(filter 1 yes true,$(HAPROXY)),--via-haproxy) $(BENCH_ARGS)
