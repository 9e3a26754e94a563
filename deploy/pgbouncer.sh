#!/usr/bin/env bash
# Run PgBouncer in the foreground in front of a local Postgres, in transaction
# pooling mode (what Heroku's and most managed Postgres poolers do):
#   deploy/pgbouncer.sh DIR PORT POSTGRES_PORT [POOL_SIZE]
# Listens on 127.0.0.1:PORT, reaches every database of 127.0.0.1:POSTGRES_PORT
# as "turnstream" (the cluster deploy/postgres.sh makes, trust on loopback),
# at most POOL_SIZE (20) server connections per database. PgBouncer refuses to
# run as root, so as root it runs as the "postgres" account.
set -euo pipefail
dir=$(realpath -m "$1"); port=$2; pg_port=$3; pool=${4:-20}
command -v pgbouncer >/dev/null || [ -x /usr/sbin/pgbouncer ] || {
  echo "pgbouncer.sh: PgBouncer is not installed (run deploy/setup.sh)" >&2; exit 1; }
mkdir -p "$dir"
cat > "$dir/pgbouncer.ini" <<EOF
[databases]
* = host=127.0.0.1 port=$pg_port user=turnstream

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = any
pool_mode = transaction
default_pool_size = $pool
max_client_conn = 5000
; A client waits this long for a server connection (Postgres restarting,
; the pool busy) before its query fails.
query_wait_timeout = 60
server_login_retry = 1
EOF
as_pg=()
if [ "$(id -u)" = 0 ]; then
  as_pg=(setpriv --reuid=postgres --regid=postgres --init-groups)
  chown -R postgres: "$dir"
fi
exec "${as_pg[@]}" "$(command -v pgbouncer || echo /usr/sbin/pgbouncer)" "$dir/pgbouncer.ini"
