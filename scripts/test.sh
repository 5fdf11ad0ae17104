#!/usr/bin/env bash
# The one command that runs every test: unit, transport conformance, HTTP contract, concurrency
# and crash tests, then a fuzzer run of the HTTP API against its OpenAPI document. The embedded
# default needs no outside service; the fuzzer is installed from PyPI into .venv/ on first use.
# Tests for real brokers and databases will start them from here.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "cargo not found: install Rust from https://rustup.rs" >&2; exit 1; }
cargo build --workspace --locked --all-targets
cargo test --workspace --locked "$@"
scripts/fuzz-openapi.sh
