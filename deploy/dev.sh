#!/usr/bin/env bash
# Run the whole system locally: Postgres, Redis, the offline model, web,
# worker, beat and Flower (Procfile.dev, under honcho). Ctrl-C stops it all.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
mkdir -p .local
export PATH="$PWD/.venv/bin:$PATH"
# Local development, said out loud: authentication is off by default here,
# which web and Flower allow only on 127.0.0.1.
export TURNSTREAM_ENV=development
export FLOWER_ADDRESS=127.0.0.1 FLOWER_PORT=5555
# For AUTH=on: a key kept across restarts, so the chat page's login lasts.
[ -s .local/secret-key ] || python -c 'import secrets; print(secrets.token_hex(32))' > .local/secret-key
export SECRET_KEY="${SECRET_KEY:-$(cat .local/secret-key)}"
# Tools: the bundled read-only SQL server over the demo shop database (the
# worker's start creates it), unless MCP_SERVERS says otherwise.
export DEMO_DATABASE_URL="${DEMO_DATABASE_URL:-postgresql://turnstream@127.0.0.1:5433/turnstream_demo}"
if [ -z "${MCP_SERVERS:-}" ]; then
  MCP_SERVERS=$(python -c 'import json, os, sys; print(json.dumps({"sql": {
    "command": sys.executable, "args": ["-m", "tasks.mcp.sql"], "cwd": os.getcwd(),
    "env": {"DATABASE_URL": "postgresql://turnstream_reader@127.0.0.1:5433/turnstream_demo"}}}))')
  export MCP_SERVERS
fi
# honcho gives each process its own $PORT; the web port travels as WEB_PORT.
export WEB_PORT="${PORT:-8000}"
echo
echo "  Turnstream chat:  http://127.0.0.1:${WEB_PORT}/"
echo "  Flower:           http://127.0.0.1:5555/"
echo "  Local development: authentication is ${AUTH:-off}; both listen on 127.0.0.1 only."
echo
exec honcho -f Procfile.dev start
