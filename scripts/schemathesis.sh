#!/usr/bin/env bash
# Fuzzes the REST API from the OpenAPI document it serves, with schemathesis
# (from PyPI, pinned, in a virtualenv under target/tools): every generated
# request, valid or not, must get an answer that is not a 5xx and that
# conforms to the document. Runs the embedded default (SQLite, no servers)
# with the development token it prints.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SCHEMATHESIS_VERSION=4.32.5
venv="$PWD/target/tools/schemathesis-$SCHEMATHESIS_VERSION"
if [ ! -x "$venv/bin/st" ]; then
    echo "schemathesis.sh: installing schemathesis $SCHEMATHESIS_VERSION into $venv" >&2
    python3 -m venv "$venv" || { echo "schemathesis.sh: python3 -m venv failed (install python3-venv)" >&2; exit 1; }
    "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi

bin="$PWD/target/debug/fluxo"
[ -x "$bin" ] || cargo build --locked --bin fluxo

work=$(mktemp -d)
pid=""
cleanup() {
    [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

# Rate limiting is off so the fuzzer explores instead of collecting 429s.
FLUXO_DATA_DIR="$work/data" FLUXO_GRPC__LISTEN=127.0.0.1:0 FLUXO_GATEWAY__LISTEN=127.0.0.1:0 \
    FLUXO_LOG__FORMAT=json FLUXO_RATE_LIMIT__ENABLED=false \
    "$bin" serve >"$work/stdout" 2>"$work/stderr" &
pid=$!
addr="" token=""
for _ in $(seq 200); do
    addr=$(sed -n 's/^ *REST *http:\/\/\([^ ]*\).*/\1/p' "$work/stderr" | head -n1)
    token=$(sed -n 's/^ *export FLUXO_TOKEN=//p' "$work/stderr" | head -n1)
    [ -n "$addr" ] && [ -n "$token" ] && break
    kill -0 "$pid" 2>/dev/null || { cat "$work/stderr" >&2; echo "schemathesis.sh: fluxo exited" >&2; exit 1; }
    sleep 0.1
done
[ -n "$addr" ] || { cat "$work/stderr" >&2; echo "schemathesis.sh: no REST address in the banner" >&2; exit 1; }

echo "==> schemathesis against http://$addr/openapi.json"
"$venv/bin/st" run "http://$addr/openapi.json" \
    --header "Authorization: Bearer $token" \
    --checks not_a_server_error,response_schema_conformance \
    --max-examples "${FLUXO_SCHEMATHESIS_EXAMPLES:-25}" \
    --seed 1 \
    --no-color
