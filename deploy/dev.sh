#!/usr/bin/env bash
# Run the whole system locally: Postgres, Redis, the offline model, web,
# worker, beat and Flower (Procfile.dev, under honcho). Ctrl-C stops it all.
#
# Its data lives in DEV_DIR (.local); its ports are PORT (web, 8000),
# FLOWER_PORT (5555), PG_PORT (5433), REDIS_PORT (6380) and MODEL_PORT (8400),
# so a second copy can run beside the first with other values.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEV_DIR="${DEV_DIR:-.local}" PG_PORT="${PG_PORT:-5433}" REDIS_PORT="${REDIS_PORT:-6380}"
export MODEL_PORT="${MODEL_PORT:-8400}" FLOWER_PORT="${FLOWER_PORT:-5555}"
# honcho gives each process its own $PORT; the web port travels as WEB_PORT.
export WEB_PORT="${PORT:-8000}"
chat="http://127.0.0.1:${WEB_PORT}/" flower="http://127.0.0.1:${FLOWER_PORT}/"

pidfile="$DEV_DIR/dev.pid"
running=$(cat "$pidfile" 2>/dev/null || true)
if [ -n "$running" ] && tr '\0' ' ' < "/proc/$running/cmdline" 2>/dev/null | grep -q honcho; then
  echo "Turnstream is already running here (pid $running): the chat is at $chat and Flower at $flower."
  echo "Stop it with Ctrl-C in its terminal, or: kill $running"
  exit 0
fi
for port in "$WEB_PORT" "$FLOWER_PORT" "$PG_PORT" "$REDIS_PORT" "$MODEL_PORT"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "dev.sh: port $port is taken by another program; stop it, or run with other ports" \
      "(PORT, FLOWER_PORT, PG_PORT, REDIS_PORT, MODEL_PORT)." >&2
    exit 1
  fi
done

bash deploy/setup.sh
mkdir -p "$DEV_DIR"
export PATH="$PWD/.venv/bin:$PATH"
# Local development, said out loud: authentication is off by default here,
# which web and Flower allow only on 127.0.0.1.
export TURNSTREAM_ENV=development FLOWER_ADDRESS=127.0.0.1
export DATABASE_URL="postgresql://turnstream@127.0.0.1:$PG_PORT/turnstream"
export REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
export OPENAI_BASE_URL="${OPENAI_BASE_URL:-http://127.0.0.1:$MODEL_PORT/v1}"
# For AUTH=on: a key kept across restarts, so the chat page's login lasts.
[ -s "$DEV_DIR/secret-key" ] || python -c 'import secrets; print(secrets.token_hex(32))' > "$DEV_DIR/secret-key"
export SECRET_KEY="${SECRET_KEY:-$(cat "$DEV_DIR/secret-key")}"
# Tools: the bundled read-only SQL server over the demo shop database (the
# worker's start creates it), unless MCP_SERVERS says otherwise.
export DEMO_DATABASE_URL="${DEMO_DATABASE_URL:-postgresql://turnstream@127.0.0.1:$PG_PORT/turnstream_demo}"
if [ -z "${MCP_SERVERS:-}" ]; then
  MCP_SERVERS=$(python -c 'import json, os, sys; print(json.dumps({"sql": {
    "command": sys.executable, "args": ["-m", "tasks.mcp.sql"], "cwd": os.getcwd(),
    "env": {"DATABASE_URL": "postgresql://turnstream_reader@127.0.0.1:" + os.environ["PG_PORT"] + "/turnstream_demo"}}}))')
  export MCP_SERVERS
fi
echo
echo "  Turnstream chat:  $chat"
echo "  Flower:           $flower"
echo "  Local development: authentication is ${AUTH:-off}; both listen on 127.0.0.1 only. Ctrl-C stops everything."
echo
echo $$ > "$pidfile"  # exec keeps this pid: the next dev.sh finds it running
exec honcho -f Procfile.dev start
