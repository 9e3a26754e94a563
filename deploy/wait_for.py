"""Wait until Postgres and Redis from the configuration answer (dev Procfile)."""

import sys
import time

import redis
from sqlalchemy import text

from shared.config import get_settings
from shared.db import get_engine
from shared.status import describe_outage

deadline = time.monotonic() + 60
while True:
    try:
        with get_engine().connect() as conn:
            conn.execute(text("SELECT 1"))
        redis.Redis.from_url(get_settings().redis_url).ping()
        break
    except Exception as exc:
        if time.monotonic() > deadline:
            sys.exit(f"wait_for: {describe_outage(exc) or exc}")
        time.sleep(0.5)
