#!/usr/bin/env bash
# Run Redis in the foreground: deploy/redis.sh DIR PORT [redis options...]
# noeviction: Redis holds the queue and the event logs; evicting either would
# lose turns or events silently, so a full Redis must refuse writes instead.
set -euo pipefail
dir=$(realpath -m "$1"); port=$2; shift 2
mkdir -p "$dir"
exec redis-server --port "$port" --bind 127.0.0.1 --dir "$dir" --maxmemory-policy noeviction \
  --save "" --appendonly no --protected-mode yes "$@"
