#!/usr/bin/env bash
# The benchmark: ./scripts/bench.sh [--smoke] [fluxo-bench run options]
#
# Builds `fluxo` and `fluxo-bench` (--release; a smoke run uses the debug
# build to stay fast), starts a throwaway PostgreSQL and Redis through
# scripts/test.sh, and runs `fluxo-bench run`: the machine's ceilings (bare
# tonic, single-row INSERT, XADD, XREADGROUP+XACK), then every scenario
# against fluxo processes on 127.0.0.1. A full run rewrites the generated
# part of BENCHMARKS.md; `--smoke` runs each phase for about a second at low
# rates and only prints its figures.
#
# Options (see `fluxo-bench run --help`): --duration SECS per phase,
# --concurrency N, --connections N, --backlog N (1,000,000 by default),
# --pipeline-rate R, --mixed-rate R, --only webhooks (that phase alone; prints only).
#
# Everything it starts is stopped when it ends, fails or is interrupted;
# the run as a whole is bounded by FLUXO_BENCH_TIMEOUT seconds (default:
# 240 for --smoke, 3600 otherwise).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

smoke=""
for arg in "$@"; do
    [ "$arg" = "--smoke" ] && smoke=1
done

if [ -n "$smoke" ]; then
    profile=debug
    cargo build --locked -p fluxo -p fluxo-bench --bins
    limit="${FLUXO_BENCH_TIMEOUT:-240}"
else
    profile=release
    cargo build --locked --release -p fluxo -p fluxo-bench --bins
    # Every acknowledged write durable, as in production: fsync on.
    export FLUXO_TEST_PG_DURABLE=1
    limit="${FLUXO_BENCH_TIMEOUT:-3600}"
fi

# scripts/test.sh brings up PostgreSQL and Redis (or uses FLUXO_TEST_POSTGRES_URL
# and FLUXO_TEST_REDIS_URL), runs our command with the URLs exported and tears the
# servers down afterwards. grpcurl is not needed here.
export FLUXO_TEST_GRPCURL="${FLUXO_TEST_GRPCURL:-unused}"
export FLUXO_BENCH_COMMAND="./scripts/bench.sh${*:+ $*}"
# fluxo-bench stops the processes it started on SIGTERM; -k kills it if it cannot.
# A full run also records where the CPU went (perf, when it can run here).
profile_flag=""
[ -z "$smoke" ] && profile_flag="--profile"
# FLUXO_BENCH_FLUXO runs another fluxo binary (say, a build of an earlier revision) against the same bench.
export FLUXO_TEST_CMD="timeout -k 15 $limit target/$profile/fluxo-bench run --fluxo ${FLUXO_BENCH_FLUXO:-target/$profile/fluxo} $profile_flag"
exec ./scripts/test.sh "$@"
