#!/usr/bin/env bash
# The one command that runs every test: unit, storage and transport conformance, HTTP
# contract, concurrency and crash tests, on SQLite, PostgreSQL and MariaDB (and the notes
# cache and the Redis Streams transport on Redis, the NATS JetStream transport on NATS, the RabbitMQ transport on RabbitMQ), then a fuzzer run of the HTTP API against its OpenAPI document.
# PostgreSQL, MariaDB, Redis, NATS and RabbitMQ are used where they answer on loopback and installed and started otherwise (scripts/services.sh); a test whose
# server does not answer fails, it is never skipped. The fuzzer is installed from PyPI into
# .venv/ on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "cargo not found: install Rust from https://rustup.rs" >&2; exit 1; }
scripts/services.sh postgres mariadb redis nats rabbitmq
cargo build --workspace --locked --all-targets
cargo test --workspace --locked "$@"
scripts/fuzz-openapi.sh
