"""Flower's settings: `celery -A tasks flower` reads this file from the
working directory (Flower's default `--conf`). They come from Turnstream's
variables (FLOWER_BASIC_AUTH, FLOWER_ADDRESS, FLOWER_PORT), validated with
the rest, so the Procfile passes Flower no flags.

Flower's control API (shutting workers down, revoking tasks) is open to
whoever passes its authentication, so Flower refuses to start without a
credential unless only this machine can reach it."""

from shared.config import ConfigError, get_settings, is_loopback

_settings = get_settings()
address = _settings.flower_address
port = _settings.flower_port
# A list, so a password holding a comma stays whole (Flower splits a string
# on commas); empty when unset, so Flower's own reading of FLOWER_BASIC_AUTH=""
# (one empty credential, which an empty Authorization header matches) is undone.
basic_auth = [_settings.flower_basic_auth] if _settings.flower_basic_auth else []
if not basic_auth and not is_loopback(address):
    raise ConfigError(
        f"Flower would listen on {address or 'every address'}:{port} with no password, and its API can shut"
        " workers down: set FLOWER_BASIC_AUTH=user:password, or FLOWER_ADDRESS=127.0.0.1 to reach it from"
        " this machine only."
    )
