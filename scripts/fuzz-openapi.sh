#!/usr/bin/env bash
# Fuzzes the HTTP API against its own OpenAPI document with schemathesis and every check it has:
# each request the document allows must be accepted, each one it forbids refused, and each answer
# (status, Content-Type, headers, body) must be one the document lists. Runs the debug binary
# that `cargo build` left, on a free port and a throwaway data directory. Needs python3, and
# PyPI the first time, to install the pinned schemathesis into .venv/.
#
#   FUZZ_EXAMPLES=N  test cases per operation and phase (default 100)
#   FUZZ_SEED=N      the run's seed (default fixed, so a failure reproduces; `random` for a new one)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

schemathesis_version=4.32.5
examples=${FUZZ_EXAMPLES:-100}
seed=${FUZZ_SEED:-20261201}
binary=${CARGO_TARGET_DIR:-target}/debug/conveyor
[ -x "$binary" ] || { echo "$binary not found: build it first (cargo build)" >&2; exit 1; }

if ! .venv/bin/st --version 2>/dev/null | grep -qF "$schemathesis_version"; then
    python3 -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check "schemathesis==$schemathesis_version"
fi

# schemathesis and hypothesis keep caches (and replay old failures) in the working directory:
# a directory of its own keeps each run independent and the repo clean.
work=$(mktemp -d)
server=
stop_server() {
    if [ -n "$server" ]; then
        kill "$server" 2>/dev/null || true
        wait "$server" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap stop_server EXIT

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
url="http://127.0.0.1:$port"
"$binary" serve --http "127.0.0.1:$port" --data "$work/data" >"$work/server.log" 2>&1 &
server=$!
for _ in $(seq 100); do
    curl -sf "$url/health/ready" >/dev/null && break
    kill -0 "$server" 2>/dev/null || { cat "$work/server.log" >&2; exit 1; }
    sleep 0.1
done

# The known location that generated `POST /events` bodies reuse (see scripts/fuzz_hooks.py).
location=$(curl -sf -d '{"name":"fuzz hall","halls":[{"capacity":10}]}' "$url/locations" |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["ID"])')

seed_option=(--seed "$seed")
[ "$seed" = random ] && seed_option=()
echo "fuzzing $url/openapi.json (schemathesis $schemathesis_version, $examples examples)"
# Two checks do not apply to one path each: bookings learns an event from its `EventCreated`
# message, a moment after `POST /events` answered, so the event's bookings (GET and POST) may be
# 404 right after it was created, as the document says; and whether a well-formed move is legal
# depends on the board (whose turn, which points are free, ko), which no schema can state, so a
# schema-valid move may be a 400 that says why (a 5xx still fails the run, by other checks).
# Every other check runs on those paths, and those checks run on every other path.
cat >"$work/schemathesis.toml" <<'TOML'
[[operations]]
include-path = "/events/{id}/bookings"
checks.ensure_resource_availability.enabled = false

[[operations]]
include-name = "POST /matches/{id}/moves"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "404", "409", "5xx"]
TOML
(
    cd "$work"
    SCHEMATHESIS_HOOKS="$repo/scripts/fuzz_hooks.py" CONVEYOR_FUZZ_LOCATION="$location" \
        CONVEYOR_FUZZ_URL="$url" \
        "$repo/.venv/bin/st" --config-file "$work/schemathesis.toml" --no-color run \
        "$url/openapi.json" --checks all \
        --max-examples "$examples" "${seed_option[@]}"
)
