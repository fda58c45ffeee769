#!/usr/bin/env bash
# The test command of the project: ./scripts/test.sh [extra cargo test args]
#
# Starts a throwaway PostgreSQL and Redis (unless FLUXO_TEST_POSTGRES_URL /
# FLUXO_TEST_REDIS_URL point at existing servers), runs
# `cargo test --workspace --locked "$@"` against them, and always tears the
# servers down again, keeping the exit code of the tests.
#
# Environment:
#   FLUXO_TEST_POSTGRES_URL      use this PostgreSQL instead of starting one
#   FLUXO_TEST_REDIS_URL         use this Redis instead of starting one
#   FLUXO_TEST_PG_BINDIR         PostgreSQL bin dir (found automatically if unset)
#   FLUXO_TEST_REDIS_SERVER_BIN  redis-server binary (found automatically if unset)
#   FLUXO_TEST_PG_DURABLE        set to run PostgreSQL with fsync and full-page
#                                writes on (the benchmark does; tests do not need it)
#   FLUXO_TEST_SKIP_K8S          set to skip the offline Kubernetes validation that
#                                follows a full cargo test run (and the platform tests,
#                                which need its tools)
#   FLUXO_TEST_SKIP_PLATFORM     set to skip the platform tests (the chart installed on a
#                                local control plane, scripts/k8s/platform-test.sh) while
#                                iterating locally; refused when CI is set
#   FLUXO_TEST_TLS=0             do not make TLS certificates nor turn TLS on in the servers
#                                started here (the TLS tests then fail, naming what is missing)
#   FLUXO_TEST_STANDARDWEBHOOKS_PYTHON
#                                a python with the standardwebhooks package (installed
#                                into target/tools if unset; the webhook signature tests)
#   FLUXO_TEST_CMD               run this shell command instead of `cargo test ...`
#                                (extra args are appended). Handy to get a shell
#                                with the servers running:
#                                  FLUXO_TEST_CMD=bash ./scripts/test.sh
# The URLs and binary paths are exported so tests can use them (some tests
# start and stop their own instances from the bin dirs). The servers started
# here also speak TLS with a certificate for 127.0.0.1/localhost signed by a CA
# made for the run (openssl); exported for the tests in tests/e2e/tls.rs:
#   FLUXO_TEST_TLS_CA            PEM of that CA
#   FLUXO_TEST_TLS_OTHER_CA      PEM of an unrelated CA (must be refused)
#   FLUXO_TEST_TLS_CERT/_KEY     the server certificate and key (for servers tests start)
#   FLUXO_TEST_REDIS_TLS_URL     rediss://127.0.0.1:<tls port> of the same Redis
#   FLUXO_TEST_POSTGRES_TLS_URL  the same PostgreSQL, without sslmode (tests add theirs)
set -euo pipefail

# Run from the repository root, whatever the caller's cwd.
cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { echo "test.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

is_root() { [ "$(id -u)" -eq 0 ]; }

# The platform tests may be skipped while iterating locally, never in CI.
if [ -n "${CI:-}" ] && [ -n "${FLUXO_TEST_SKIP_PLATFORM:-}" ]; then
    die "FLUXO_TEST_SKIP_PLATFORM is for local iteration only; CI runs the platform tests"
fi

# --- cleanup -----------------------------------------------------------------
# Everything we start is recorded here so the trap can stop it, also when the
# tests fail or the script is interrupted.
tmp_dir=""
pg_data=""
redis_pid=""

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    if [ -n "$pg_data" ] && [ -f "$pg_data/postmaster.pid" ]; then
        local pg_pid
        pg_pid=$(head -n 1 "$pg_data/postmaster.pid" 2>/dev/null)
        # No checkpoint needed, the data is thrown away anyway.
        as_pg_user "$FLUXO_TEST_PG_BINDIR/pg_ctl" -D "$pg_data" -m immediate -s stop >/dev/null 2>&1
        # Belt and braces: never leave an orphaned postmaster behind.
        if [ -n "$pg_pid" ] && kill -0 "$pg_pid" 2>/dev/null; then
            kill -KILL "$pg_pid" 2>/dev/null
        fi
    fi
    if [ -n "$redis_pid" ] && kill -0 "$redis_pid" 2>/dev/null; then
        kill "$redis_pid" 2>/dev/null
        wait "$redis_pid" 2>/dev/null
    fi
    if [ -n "$tmp_dir" ]; then
        rm -rf "$tmp_dir"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- helpers -----------------------------------------------------------------
apt_updated=""
# Install Debian packages, but only when we can (root + apt-get): CI machines
# may come with nothing but the toolchains.
apt_install() {
    is_root && command -v apt-get >/dev/null 2>&1 || return 1
    if [ -z "$apt_updated" ]; then
        log "running apt-get update"
        DEBIAN_FRONTEND=noninteractive apt-get update -q >&2 || return 1
        apt_updated=1
    fi
    log "installing $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >&2
}

# PostgreSQL refuses to run as root, so as root we run the server tools as
# the `postgres` system user.
as_pg_user() {
    if is_root; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

# A free TCP port on 127.0.0.1 (the OS picks it; tiny race until we bind it).
free_port() {
    if command -v python3 >/dev/null 2>&1; then
        python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
        return
    fi
    local port
    for _ in $(seq 100); do
        port=$((20000 + RANDOM % 40000))
        if [ -z "$(ss -Htln "sport = :$port")" ]; then
            echo "$port"
            return
        fi
    done
    die "could not find a free TCP port"
}

# Prints the PostgreSQL bin dir (one that has the server tools), if any.
find_pg_bindir() {
    local dir candidates=()
    [ -n "${FLUXO_TEST_PG_BINDIR:-}" ] && candidates+=("$FLUXO_TEST_PG_BINDIR")
    if command -v pg_config >/dev/null 2>&1; then
        candidates+=("$(pg_config --bindir 2>/dev/null || true)")
    fi
    # Debian layout; newest version first.
    for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -rV); do
        candidates+=("$dir")
    done
    if command -v initdb >/dev/null 2>&1; then
        candidates+=("$(dirname "$(readlink -f "$(command -v initdb)")")")
    fi
    # pg_config may belong to a client-only install, so check for the server.
    for dir in "${candidates[@]}"; do
        if [ -n "$dir" ] && [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ] &&
            [ -x "$dir/postgres" ] && [ -x "$dir/pg_isready" ]; then
            echo "$dir"
            return 0
        fi
    done
    return 1
}

find_redis_server() {
    if [ -n "${FLUXO_TEST_REDIS_SERVER_BIN:-}" ] && [ -x "$FLUXO_TEST_REDIS_SERVER_BIN" ]; then
        echo "$FLUXO_TEST_REDIS_SERVER_BIN"
    else
        local bin
        bin=$(command -v redis-server) && [ -x "$bin" ] && echo "$bin"
    fi
}

redis_ping() { # port
    if command -v redis-cli >/dev/null 2>&1; then
        [ "$(redis-cli -h 127.0.0.1 -p "$1" ping 2>/dev/null)" = "PONG" ]
    else
        # No redis-cli (and nothing to install it with): speak RESP directly.
        local reply
        exec 3<>"/dev/tcp/127.0.0.1/$1" 2>/dev/null || return 1
        printf 'PING\r\n' >&3
        read -r -t 2 reply <&3 || true
        exec 3<&- 3>&-
        [ "${reply%$'\r'}" = "+PONG" ]
    fi
}

make_tmp_dir() {
    [ -n "$tmp_dir" ] && return
    # Under /tmp so that the postgres user can reach it when we are root.
    tmp_dir=$(mktemp -d /tmp/fluxo-test.XXXXXX)
}

# --- TLS material ------------------------------------------------------------
# A CA and a server certificate for 127.0.0.1 and localhost, made fresh for each run.
tls_dir=""
if [ "${FLUXO_TEST_TLS:-1}" != 0 ]; then
    command -v openssl >/dev/null 2>&1 || apt_install openssl || true
    if command -v openssl >/dev/null 2>&1; then
        make_tmp_dir
        tls_dir="$tmp_dir/tls"
        mkdir "$tls_dir"
        (
            cd "$tls_dir"
            for ca in ca other-ca; do
                openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=fluxo test $ca" \
                    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
                    -keyout "$ca.key" -out "$ca.pem"
            done
            openssl req -newkey rsa:2048 -nodes -subj /CN=localhost -keyout server.key -out server.csr
            printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' >server.ext
            openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
                -extfile server.ext -out server.pem
            chmod 600 server.key
        ) >"$tmp_dir/openssl.log" 2>&1 || { cat "$tmp_dir/openssl.log" >&2; die "making the test TLS certificates failed"; }
        export FLUXO_TEST_TLS_CA="$tls_dir/ca.pem" FLUXO_TEST_TLS_OTHER_CA="$tls_dir/other-ca.pem"
        export FLUXO_TEST_TLS_CERT="$tls_dir/server.pem" FLUXO_TEST_TLS_KEY="$tls_dir/server.key"
    else
        log "openssl not found: the TLS tests will fail"
    fi
fi

# --- PostgreSQL --------------------------------------------------------------
if [ -z "${FLUXO_TEST_POSTGRES_URL:-}" ]; then
    if ! pg_bindir=$(find_pg_bindir); then
        apt_install postgresql || true
        pg_bindir=$(find_pg_bindir) ||
            die "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found; install PostgreSQL or set FLUXO_TEST_POSTGRES_URL"
    fi
    export FLUXO_TEST_PG_BINDIR="$pg_bindir"

    if is_root; then
        id postgres >/dev/null 2>&1 || useradd --system --user-group --no-create-home postgres
    fi
    make_tmp_dir
    pg_data="$tmp_dir/pg"
    pg_port=$(free_port)
    mkdir "$pg_data"
    is_root && chown -R postgres: "$tmp_dir"

    # Trust auth and (unless FLUXO_TEST_PG_DURABLE) no durability: a throwaway
    # server for tests that create and drop many short-lived databases.
    (cd "$tmp_dir" && as_pg_user "$pg_bindir/initdb" -D "$pg_data" -U postgres \
        --auth=trust -E UTF8 --locale=C >"$tmp_dir/initdb.log" 2>&1) ||
        { cat "$tmp_dir/initdb.log" >&2; die "initdb failed"; }
    cat >>"$pg_data/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $pg_port
unix_socket_directories = '$tmp_dir'
max_connections = 300
EOF
    if [ -z "${FLUXO_TEST_PG_DURABLE:-}" ]; then
        printf 'fsync = off\nfull_page_writes = off\n' >>"$pg_data/postgresql.conf"
    fi
    if [ -n "$tls_dir" ]; then
        # TLS on (plain connections still allowed): the server's own copy of the key, which
        # PostgreSQL wants owned by its user and private.
        cp "$tls_dir/server.pem" "$tls_dir/server.key" "$pg_data/"
        is_root && chown postgres: "$pg_data/server.pem" "$pg_data/server.key"
        printf "ssl = on\nssl_cert_file = 'server.pem'\nssl_key_file = 'server.key'\n" >>"$pg_data/postgresql.conf"
    fi
    # pg_ctl -w notices a server that dies on startup; pg_isready below
    # confirms it really answers on TCP.
    (cd "$tmp_dir" && as_pg_user "$pg_bindir/pg_ctl" -D "$pg_data" -l "$tmp_dir/postgres.log" \
        -w -t 30 -s start) ||
        { tail -n 30 "$tmp_dir/postgres.log" >&2 || true; die "pg_ctl start failed"; }

    for i in $(seq 300); do
        "$pg_bindir/pg_isready" -q -h 127.0.0.1 -p "$pg_port" -U postgres && break
        if [ "$i" -eq 300 ]; then
            tail -n 30 "$tmp_dir/postgres.log" >&2 || true
            die "PostgreSQL did not become ready on port $pg_port within 30 s"
        fi
        sleep 0.1
    done
    export FLUXO_TEST_POSTGRES_URL="postgres://postgres@127.0.0.1:$pg_port/postgres"
    [ -z "$tls_dir" ] || export FLUXO_TEST_POSTGRES_TLS_URL="$FLUXO_TEST_POSTGRES_URL"
elif [ -z "${FLUXO_TEST_PG_BINDIR:-}" ] && pg_bindir=$(find_pg_bindir); then
    # External server given; still tell tests where local binaries are.
    export FLUXO_TEST_PG_BINDIR="$pg_bindir"
fi

# --- Go tools: grpcurl, ghz; curl ----------------------------------------------
# Pinned, built from the Go module proxy into target/tools so a fresh machine
# needs nothing but Go; reused while the binary there was built from that version.
go_tool() { # name module version -> prints the binary's path
    local tools_dir="$PWD/target/tools"
    if [ ! -x "$tools_dir/$1" ] || ! go version -m "$tools_dir/$1" 2>/dev/null | grep -q "[[:space:]]$3\b"; then
        command -v go >/dev/null 2>&1 || die "go not found: it is needed to install $1 for the tests"
        log "installing $1 $3 into $tools_dir"
        GOBIN="$tools_dir" go install "$2@$3" >&2 || die "could not install $1 $3 with go install"
    fi
    echo "$tools_dir/$1"
}
# The end-to-end tests drive the built binary with grpcurl over server
# reflection only, as a newcomer would.
if [ -z "${FLUXO_TEST_GRPCURL:-}" ]; then
    FLUXO_TEST_GRPCURL=$(go_tool grpcurl github.com/fullstorydev/grpcurl/cmd/grpcurl v1.9.4)
    export FLUXO_TEST_GRPCURL
fi
# Wire-level tests use clients fluxo did not write: ghz (grpc-go) for calls one
# at a time, curl (HTTP/2 with nghttp2) for raw gRPC frames.
if [ -z "${FLUXO_TEST_GHZ:-}" ]; then
    FLUXO_TEST_GHZ=$(go_tool ghz github.com/bojand/ghz/cmd/ghz v0.120.0)
    export FLUXO_TEST_GHZ
fi
# Webhook signatures are checked against an implementation fluxo did not write:
# the Standard Webhooks reference library from PyPI, in a venv of its own.
if [ -z "${FLUXO_TEST_STANDARDWEBHOOKS_PYTHON:-}" ]; then
    sw_version=1.3.0
    sw_venv="$PWD/target/tools/standardwebhooks-$sw_version"
    if [ ! -x "$sw_venv/bin/python" ] || ! "$sw_venv/bin/python" -c "import standardwebhooks" 2>/dev/null; then
        log "installing standardwebhooks $sw_version into $sw_venv"
        rm -rf "$sw_venv"
        python3 -m venv "$sw_venv" || die "python3 -m venv failed (install python3-venv): it is needed for the webhook signature tests"
        "$sw_venv/bin/pip" install --quiet --disable-pip-version-check "standardwebhooks==$sw_version" >&2 \
            || die "could not pip install standardwebhooks==$sw_version"
    fi
    export FLUXO_TEST_STANDARDWEBHOOKS_PYTHON="$sw_venv/bin/python"
fi
if ! curl --version 2>/dev/null | grep -q HTTP2; then
    apt_install curl || true
    curl --version 2>/dev/null | grep -q HTTP2 || die "curl with HTTP/2 support is needed for the wire tests"
fi

# --- Redis -------------------------------------------------------------------
if [ -z "${FLUXO_TEST_REDIS_URL:-}" ]; then
    if ! redis_bin=$(find_redis_server); then
        apt_install redis-server redis-tools || true
        redis_bin=$(find_redis_server) ||
            die "redis-server not found; install Redis or set FLUXO_TEST_REDIS_URL"
    fi
    if ! command -v redis-cli >/dev/null 2>&1; then
        apt_install redis-tools || true
    fi
    export FLUXO_TEST_REDIS_SERVER_BIN="$redis_bin"

    make_tmp_dir
    redis_port=$(free_port)
    redis_tls=()
    if [ -n "$tls_dir" ]; then
        redis_tls_port=$(free_port)
        # A second, TLS port on the same server (clients need no certificate of their own).
        # Debian's redis-server is built with TLS; one that is not refuses these options.
        redis_tls=(--tls-port "$redis_tls_port" --tls-cert-file "$tls_dir/server.pem"
            --tls-key-file "$tls_dir/server.key" --tls-ca-cert-file "$tls_dir/ca.pem" --tls-auth-clients no)
    fi
    # Not daemonized, so we know its pid; no persistence, nothing to keep.
    "$redis_bin" --bind 127.0.0.1 --port "$redis_port" --save '' --appendonly no \
        "${redis_tls[@]}" --dir "$tmp_dir" >"$tmp_dir/redis.log" 2>&1 </dev/null &
    redis_pid=$!

    for i in $(seq 300); do
        redis_ping "$redis_port" && break
        if ! kill -0 "$redis_pid" 2>/dev/null; then
            tail -n 30 "$tmp_dir/redis.log" >&2 || true
            die "redis-server exited during startup (port $redis_port)"
        fi
        if [ "$i" -eq 300 ]; then
            tail -n 30 "$tmp_dir/redis.log" >&2 || true
            die "Redis did not answer PING on port $redis_port within 30 s"
        fi
        sleep 0.1
    done
    export FLUXO_TEST_REDIS_URL="redis://127.0.0.1:$redis_port"
    [ "${#redis_tls[@]}" -eq 0 ] || export FLUXO_TEST_REDIS_TLS_URL="rediss://127.0.0.1:$redis_tls_port"
elif [ -z "${FLUXO_TEST_REDIS_SERVER_BIN:-}" ] && redis_bin=$(command -v redis-server); then
    export FLUXO_TEST_REDIS_SERVER_BIN="$redis_bin"
fi

# --- tests -------------------------------------------------------------------
echo "==> tests with PostgreSQL $FLUXO_TEST_POSTGRES_URL and Redis $FLUXO_TEST_REDIS_URL"
status=0
if [ -n "${FLUXO_TEST_CMD:-}" ]; then
    bash -c "$FLUXO_TEST_CMD"' "$@"' fluxo-test "$@" || status=$?
else
    cargo test --workspace --locked "$@" || status=$?
    # The whole suite also fuzzes the REST API and validates the Kubernetes
    # packaging offline; a run narrowed by cargo test arguments skips both.
    if [ "$status" -eq 0 ] && [ "$#" -eq 0 ]; then
        # The REST API fuzzed from its own OpenAPI document.
        echo "==> REST API fuzzing (scripts/schemathesis.sh)"
        ./scripts/schemathesis.sh || status=$?
    fi
    if [ "$status" -eq 0 ] && [ "$#" -eq 0 ] && [ -z "${FLUXO_TEST_SKIP_K8S:-}" ]; then
        echo "==> Kubernetes packaging (scripts/validate-k8s.sh)"
        ./scripts/validate-k8s.sh || status=$?
    elif [ "$#" -eq 0 ] && [ -n "${FLUXO_TEST_SKIP_K8S:-}" ]; then
        echo "==> Kubernetes packaging and platform tests SKIPPED (FLUXO_TEST_SKIP_K8S is set)"
    fi
    # The chart on a live control plane (etcd, kube-apiserver, controller-manager, scheduler
    # built from the Go module proxy, kwok nodes): install, upgrade, rollback, drain, uninstall.
    if [ "$status" -eq 0 ] && [ "$#" -eq 0 ] && [ -z "${FLUXO_TEST_SKIP_K8S:-}" ]; then
        if [ -n "${FLUXO_TEST_SKIP_PLATFORM:-}" ]; then
            echo "==> Kubernetes platform tests SKIPPED (FLUXO_TEST_SKIP_PLATFORM is set)"
        else
            echo "==> Kubernetes platform tests (scripts/k8s/platform-test.sh)"
            ./scripts/k8s/platform-test.sh || status=$?
        fi
    fi
fi
exit "$status"
