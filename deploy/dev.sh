#!/usr/bin/env bash
# Run the whole system locally: Postgres, Redis, the offline model, web,
# worker, beat and Flower (Procfile.dev, under honcho). Ctrl-C stops it all.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
mkdir -p .local
export PATH="$PWD/.venv/bin:$PATH"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PORT="${PORT:-8000}"
echo
echo "  Turnstream chat:  http://127.0.0.1:${PORT}/"
echo "  Flower:           http://127.0.0.1:5555/"
echo
exec honcho -f Procfile.dev start
