"""The baseline of tests/bench/relay.py: flask-sse as its documentation sets
it up, served by the same gunicorn configuration as Turnstream's web
(`gunicorn -c deploy/gunicorn.conf.py tests.bench.flask_sse_app:app`).
A client follows `/stream?channel=NAME`."""

from __future__ import annotations

import os

from flask import Flask
from flask_sse import sse

app = Flask(__name__)
app.config["REDIS_URL"] = os.environ["REDIS_URL"]
app.register_blueprint(sse, url_prefix="/stream")
