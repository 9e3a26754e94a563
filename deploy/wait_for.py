"""Wait until Postgres and Redis from the configuration answer (dev Procfile)."""

import sys
import time

import redis
from sqlalchemy import text

from shared.config import get_settings
from shared.db import get_engine

deadline = time.monotonic() + 60
while True:
    try:
        with get_engine().connect() as conn:
            conn.execute(text("SELECT 1"))
        redis.Redis.from_url(get_settings().redis_url).ping()
        break
    except Exception as exc:
        if time.monotonic() > deadline:
            sys.exit(f"wait_for: Postgres or Redis did not come up: {exc}")
        time.sleep(0.5)
