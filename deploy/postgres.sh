#!/usr/bin/env bash
# Run a private Postgres cluster in the foreground: deploy/postgres.sh DIR PORT [postgres options...]
# Creates the cluster (superuser "turnstream", database "turnstream", trust on
# loopback) the first time. initdb and postgres refuse to run as root, so as
# root they run as the "postgres" account that Debian's package creates.
set -euo pipefail
dir=$(realpath -m "$1"); port=$2; shift 2
bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
[ -x "$bindir/postgres" ] || { echo "postgres.sh: PostgreSQL is not installed (run deploy/setup.sh)" >&2; exit 1; }
as_pg=()
if [ "$(id -u)" = 0 ]; then
  # setpriv execs the command as postgres (runuser would stand between, and
  # on SIGTERM kill Postgres two seconds later, mid-shutdown).
  as_pg=(setpriv --reuid=postgres --regid=postgres --init-groups)
  # A checkout in a private directory (root's home): the postgres account
  # cannot reach DIR, so the cluster lives in its own home instead.
  mkdir -p "$dir"
  if ! "${as_pg[@]}" test -x "$dir"; then
    dir="/var/lib/postgresql/turnstream/$(printf %s "$dir" | sha256sum | cut -c1-16)"
    mkdir -p "$dir" && chown postgres: "$(dirname "$dir")"
  fi
fi
if [ ! -s "$dir/PG_VERSION" ]; then
  mkdir -p "$dir"
  [ "$(id -u)" = 0 ] && chown postgres: "$dir" && chmod 700 "$dir"
  "${as_pg[@]}" "$bindir/initdb" -D "$dir" -U turnstream -A trust -E UTF8 --no-sync >/dev/null
  echo "CREATE DATABASE turnstream" | "${as_pg[@]}" "$bindir/postgres" --single -D "$dir" postgres >/dev/null
fi
"${as_pg[@]}" "$bindir/postgres" -D "$dir" -p "$port" -k "$dir" -c listen_addresses=127.0.0.1 "$@" &
pid=$!
# Stopped with SIGTERM (honcho, a test) or SIGINT (Ctrl-C): Postgres's own
# SIGTERM waits for every client to leave, and honcho kills what is still
# running 5 s later, leaving its lock file; ask for a fast shutdown instead.
trap 'kill -INT "$pid" 2>/dev/null' TERM INT
while kill -0 "$pid" 2>/dev/null; do wait "$pid" || true; done
