#!/usr/bin/env bash
# Run a private RabbitMQ node in the foreground: deploy/rabbitmq.sh DIR PORT
# AMQP on 127.0.0.1:PORT (user guest, which RabbitMQ admits from loopback
# only), data and logs in DIR, no plugins. The node's name and its
# distribution port (RABBITMQ_DIST_PORT, else PORT + 10000 folded into
# 30000-59999) come from PORT, so several nodes share a machine.
set -euo pipefail
dir=$(realpath -m "$1"); port=$2
server=/usr/lib/rabbitmq/bin/rabbitmq-server
[ -x "$server" ] || { echo "rabbitmq.sh: RabbitMQ is not installed (run deploy/setup.sh)" >&2; exit 1; }
mkdir -p "$dir/log"
echo "[]." > "$dir/enabled_plugins"
cat > "$dir/rabbitmq.conf" <<EOF
listeners.tcp.default = 127.0.0.1:$port
# A turn's message stays unacknowledged while it runs (late acks); turns are
# bounded well below this, and a channel past it would be closed.
consumer_timeout = 3600000
EOF
export HOME="$dir"  # the Erlang cookie
export RABBITMQ_NODENAME="turnstream-$port@localhost"
export RABBITMQ_DIST_PORT="${RABBITMQ_DIST_PORT:-$(( (port + 10000) % 30000 + 30000 ))}"
export RABBITMQ_MNESIA_BASE="$dir/mnesia" RABBITMQ_LOG_BASE="$dir/log"
export RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf" RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins"
export RABBITMQ_ADVANCED_CONFIG_FILE="$dir/advanced.config" RABBITMQ_PID_FILE="$dir/pid"
export RABBITMQ_LOGS=-  # to stdout
cd "$dir"
exec "$server"
