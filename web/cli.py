"""Operator commands: `flask --app web db upgrade | keys create/list/revoke | assistants list/create/show |
webhooks list/create/deliveries | sessions export | turns`; `replay` and `sets`
are web/replay_cli.py's."""

from __future__ import annotations

import json
import logging
import sys
import uuid

import click
from flask import Blueprint
from flask.cli import AppGroup
from sqlalchemy import func, select

from shared.broker import send_turn
from shared.config import get_settings
from shared.db import transaction
from shared.models import (
    ApiKey,
    Assistant,
    AssistantVersion,
    ChatSession,
    Owner,
    Turn,
    WebhookDelivery,
    WebhookEndpoint,
)
from shared.recovery import alive, claimed_lately, requeue_stale_running, requeue_turn, resend_queued
from shared.status import describe_outage
from shared.turn_states import ACTIVE, QUEUED, RUNNING, STATUSES

bp = Blueprint("cli", __name__, cli_group=None)


class OperatorCommand(click.Command):
    """A command that reaches Postgres or Redis. One that cannot be reached is
    a line naming where it was looked for and the setting, not a traceback;
    `--verbose` shows the traceback."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.params.append(
            click.Option(
                ["-v", "--verbose"],
                is_flag=True,
                expose_value=False,
                help="Show the whole traceback of an error.",
                callback=lambda ctx, _param, value: ctx.meta.__setitem__("verbose", value),
            )
        )

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except Exception as exc:
            outage = describe_outage(exc)
            if outage is None or ctx.meta.get("verbose"):
                raise
            raise click.ClickException(f"{outage} (--verbose shows the traceback)") from None


class OperatorGroup(AppGroup):
    command_class = OperatorCommand


@bp.cli.group("db", cls=OperatorGroup)
def db_group() -> None:
    """Database schema."""


@db_group.command("upgrade")
@click.argument("revision", default="head")
def db_upgrade(revision: str) -> None:
    """Apply Alembic migrations (the Procfile's release step)."""
    # Alembic announces each of its plugins at INFO as it loads them; the
    # migrations it applies are what an operator wants to read.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    from shared.migrate import upgrade

    upgrade(revision)
    click.echo(f"database at {revision}")


@bp.cli.group("keys", cls=OperatorGroup)
def keys_group() -> None:
    """API keys."""


@keys_group.command("create")
@click.argument("name")
@click.option("--label", default="default", help="A name for this key, to tell keys apart.")
def keys_create(name: str, label: str) -> None:
    """Create an API key for owner NAME and print it once (only a hash is kept)."""
    from web.auth import create_key

    key = create_key(name, label)
    click.echo(key)
    click.echo(
        f"API key for {name} ({label}): shown this once. Send it as 'Authorization: Bearer <key>' or"
        " 'X-API-Key: <key>', or paste it into the chat page's sign-in.",
        err=True,
    )


@keys_group.command("list")
@click.option("--owner", "owner_name", help="Only this owner's keys.")
def keys_list(owner_name: str | None) -> None:
    """Every key: its id, prefix, owner, label, when it was made and whether it was revoked."""
    query = select(ApiKey, Owner.name).join(Owner, Owner.id == ApiKey.owner_id).order_by(ApiKey.created_at)
    if owner_name is not None:
        query = query.where(Owner.name == owner_name)
    with transaction() as db:
        rows = db.execute(query).all()
    if not rows:
        click.echo("no keys" + (f" for {owner_name}" if owner_name else "") + ": make one with `keys create NAME`")
        return
    click.echo(f"{'id':36}  {'prefix':10}  {'owner':20}  {'label':12}  {'created':16}  status")
    for key, owner in rows:
        status = f"revoked {key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "active"
        created = f"{key.created_at:%Y-%m-%d %H:%M}"
        click.echo(f"{key.id:36}  {key.prefix or '-':10}  {owner:20}  {key.name:12}  {created:16}  {status}")


@keys_group.command("revoke")
@click.argument("keys", nargs=-1, required=True)
def keys_revoke(keys: tuple[str, ...]) -> None:
    """Revoke keys by id or prefix (as `keys list` shows them). A revoked key,
    and every chat-page login made with it, stops working within
    KEY_CACHE_SECONDS (60 by default) in every web process."""
    from web.auth import revoke_keys

    with transaction() as db:
        revoked = revoke_keys(db, list(keys))
    for key in revoked:
        click.echo(f"revoked {key.id} ({key.prefix or 'no prefix'}, {key.name})")
    matched = {k.id for k in revoked} | {k.prefix for k in revoked}
    missing = [k for k in keys if k not in matched]
    if missing:
        click.echo(f"no active key matches: {', '.join(missing)}", err=True)
        sys.exit(1)


@bp.cli.group("assistants", cls=OperatorGroup)
def assistants_group() -> None:
    """Assistants: who answers an owner's sessions."""


_OWNER = click.option("--owner", default="local", show_default=True, help="The owner's name.")


@assistants_group.command("list")
@_OWNER
def assistants_list(owner: str) -> None:
    """The owner's assistants: id, name, latest version of how many, endpoint, model, tools."""
    query = (
        select(Assistant, AssistantVersion)
        .join(Owner, Owner.id == Assistant.owner_id)
        .join(
            AssistantVersion,
            (AssistantVersion.assistant_id == Assistant.id) & (AssistantVersion.version == Assistant.latest),
        )
        .where(Owner.name == owner)
        .order_by(Assistant.name)
    )
    with transaction() as db:
        rows = db.execute(query).all()
    if not rows:
        click.echo(f"{owner} has no assistants: make one with `assistants create NAME`")
        return
    click.echo(f"{'id':36}  {'name':24}  {'version':9}  {'endpoint':12}  {'model':24}  tools")
    for a, v in rows:
        tools = ", ".join(f"{server}: {' '.join(names)}" for server, names in v.tools.items()) or "-"
        click.echo(f"{a.id:36}  {a.name:24}  {f'{a.latest}/{a.versions}':9}  {v.endpoint:12}  {v.model:24}  {tools}")


@assistants_group.command("create")
@click.argument("name")
@_OWNER
@click.option("--from", "source", type=click.File(), help="A JSON profile as the API takes it (- for stdin).")
@click.option("--instructions", help="The system prompt.")
@click.option("--endpoint", help="A model endpoint's name (MODEL_ENDPOINTS; default: OPENAI_BASE_URL's).")
@click.option("--model", help="The model's name (with the default endpoint, OPENAI_MODEL unless given).")
@click.option("--temperature", type=float)
@click.option("--max-tokens", type=int)
@click.option("--tools", "tools", multiple=True, metavar="SERVER=TOOL,TOOL", help="Tools it may use (* for all).")
def assistants_create(name: str, owner: str, source, tools: tuple[str, ...], **fields) -> None:
    """Make assistant NAME for the owner from --from's profile and the
    options (which win); print it as JSON."""
    from web.assistants import assistant_json, create_assistant
    from web.auth import get_or_create_owner
    from web.errors import ApiError
    from web.validation import AssistantBody, validate

    profile = json.load(source) if source is not None else {}
    if not isinstance(profile, dict):
        raise click.BadParameter("must hold a JSON object", param_hint="--from")
    profile.update({k: v for k, v in fields.items() if v is not None}, name=name)
    for spec in tools:
        server, sep, names = spec.partition("=")
        if not sep:
            raise click.BadParameter(f"{spec!r} is not SERVER=TOOL,TOOL", param_hint="--tools")
        profile.setdefault("tools", {})[server] = [n.strip() for n in names.split(",") if n.strip()]
    try:
        with transaction() as db:
            body = validate(AssistantBody, profile)
            assistant = create_assistant(db, get_or_create_owner(db, owner).id, body, get_settings())
            db.refresh(assistant)
            data = assistant_json(assistant, db.get(AssistantVersion, (assistant.id, 1)))
    except ApiError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(data, indent=2))


@assistants_group.command("show")
@click.argument("assistant")
@_OWNER
@click.option("--version", type=int, help="This version (default: its latest).")
def assistants_show(assistant: str, owner: str, version: int | None) -> None:
    """Print ASSISTANT (its name or id) as JSON, at its latest version or --version."""
    from web.assistants import assistant_json

    with transaction() as db:
        found = assistant_named(db, owner, assistant)
        shown = db.get(AssistantVersion, (found.id, version or found.latest))
        if shown is None:
            raise click.BadParameter(f"{found.name} has versions 1 to {found.versions}", param_hint="--version")
        click.echo(json.dumps(assistant_json(found, shown), indent=2))


def assistant_named(db, owner: str, assistant: str) -> Assistant:
    """The owner's assistant by name or id, or a usage error."""
    query = select(Assistant).join(Owner, Owner.id == Assistant.owner_id).where(Owner.name == owner)
    found = db.scalar(query.where(Assistant.name == assistant))
    if found is None and is_uuid(assistant):
        found = db.scalar(query.where(Assistant.id == assistant))
    if found is None:
        raise click.BadParameter(f"{owner} has no assistant {assistant!r} (`assistants list` shows them)")
    return found


def is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


@bp.cli.group("webhooks", cls=OperatorGroup)
def webhooks_group() -> None:
    """Webhook endpoints: where an owner's other systems are told of events."""


@webhooks_group.command("list")
@_OWNER
def webhooks_list(owner: str) -> None:
    """The owner's endpoints: id, enabled, event types, URL."""
    query = (
        select(WebhookEndpoint)
        .join(Owner, Owner.id == WebhookEndpoint.owner_id)
        .where(Owner.name == owner)
        .order_by(WebhookEndpoint.created_at)
    )
    with transaction() as db:
        endpoints = db.scalars(query).all()
    if not endpoints:
        click.echo(f"{owner} has no webhook endpoints: add one with `webhooks create URL --event turn.completed`")
        return
    for e in endpoints:
        state = "enabled" if e.enabled else f"disabled ({e.disabled_reason or 'by request'})"
        click.echo(f"{e.id}  {state}  {','.join(e.event_types)}  {e.url}")


@webhooks_group.command("create")
@click.argument("url")
@_OWNER
@click.option("--event", "events", multiple=True, required=True, help="An event type to send (repeat for more).")
def webhooks_create(url: str, owner: str, events: tuple[str, ...]) -> None:
    """Add an endpoint for the owner; print it as JSON, with its secret (shown this once)."""
    from web.auth import get_or_create_owner
    from web.errors import ApiError
    from web.validation import WebhookCreate, validate
    from web.webhooks import create_endpoint

    try:
        with transaction() as db:
            body = validate(WebhookCreate, {"url": url, "event_types": list(events)})
            data = create_endpoint(db, get_or_create_owner(db, owner).id, body)
    except ApiError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(data, indent=2))


@webhooks_group.command("deliveries")
@click.argument("endpoint_id")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 1000))
def webhooks_deliveries(endpoint_id: str, limit: int) -> None:
    """An endpoint's latest deliveries: id, event type, status, attempts, the last answer."""
    if not is_uuid(endpoint_id):
        raise click.BadParameter(f"{endpoint_id!r} is not an endpoint's id (`webhooks list` shows them)")
    with transaction() as db:
        rows = db.scalars(
            select(WebhookDelivery)
            .where(WebhookDelivery.endpoint_id == endpoint_id)
            .order_by(WebhookDelivery.created_at.desc())
            .limit(limit)
        ).all()
    for d in rows:
        last = d.last_error or (f"HTTP {d.last_status}" if d.last_status else "-")
        click.echo(f"{d.id}  {d.event_type:18}  {d.status:9}  {d.attempts} attempts  {last}")


@bp.cli.group("sessions", cls=OperatorGroup)
def sessions_group() -> None:
    """Sessions: write one out."""


@sessions_group.command("export")
@click.argument("session_id")
@click.option("--format", "fmt", type=click.Choice(["json", "markdown"]), default="json", show_default=True)
@click.option("--out", type=click.File("w"), default="-", help="Where to write it (default: stdout).")
def sessions_export(session_id: str, fmt: str, out) -> None:
    """Write SESSION_ID out: as JSON, its whole tree (every branch); as
    Markdown, its active path. The same as GET /api/sessions/{id}/export."""
    from web.transcripts import export, markdown

    with transaction() as db:
        chat = db.get(ChatSession, session_id) if is_uuid(session_id) else None
        if chat is None:
            raise click.BadParameter(f"no session {session_id!r}", param_hint="SESSION_ID")
        data = export(db, chat)
    out.write(markdown(data) if fmt == "markdown" else json.dumps(data, indent=2) + "\n")


@bp.cli.group("turns", cls=OperatorGroup)
def turns_group() -> None:
    """See and re-send stuck turns."""


@turns_group.command("list")
@click.option("--status", "statuses", multiple=True, type=click.Choice(STATUSES), help="Repeatable; default: active.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10_000), help="The newest this many.")
def turns_list(statuses: tuple[str, ...], limit: int) -> None:
    """Turns, newest first, with their age, (running ones) heartbeat and
    (failed ones) error code."""
    statuses = statuses or ACTIVE
    with transaction() as db:
        rows = db.execute(
            select(Turn.id, Turn.status, Turn.attempts, func.now() - Turn.created_at, claimed_lately(), Turn.error)
            .where(Turn.status.in_(statuses))
            .order_by(Turn.created_at.desc())
            .limit(limit)
        ).all()
    if not rows:
        named = " or ".join(statuses) if len(statuses) < 3 else f"{', '.join(statuses[:-1])} or {statuses[-1]}"
        click.echo(f"no {named} turns")
        return
    beats = alive([r.id for r in rows])
    click.echo(f"{'id':36}  {'status':9}  {'attempts':>8}  {'age s':>8}  {'heartbeat':9}  error")
    for (turn_id, status, attempts, age, fresh, error), beat in zip(rows, beats, strict=True):
        heartbeat = ("alive" if beat or fresh else "STALE") if status == RUNNING else "-"
        code = error["code"] if error else "-"
        click.echo(f"{turn_id:36}  {status:9}  {attempts:>8}  {age.total_seconds():>8.0f}  {heartbeat:9}  {code}")


@turns_group.command("requeue")
@click.argument("turn_ids", nargs=-1)
@click.option("--stale", is_flag=True, help="Every stuck turn, as the sweeper would pick them now.")
@click.option("--force", is_flag=True, help="Re-queue running turns even with a live heartbeat.")
def turns_requeue(turn_ids: tuple[str, ...], stale: bool, force: bool) -> None:
    """Send queued turns again and hand running ones (heartbeat gone, or
    --force) back to the queue. Safe to repeat: only one claim of a turn wins."""
    if stale == bool(turn_ids):
        raise click.UsageError("give TURN_IDS or --stale")
    if stale:
        click.echo(f"re-sent {resend_queued()} queued, re-queued {requeue_stale_running()} running")
        return
    with transaction() as db:
        turns = {
            t.id: (t, fresh) for t, fresh in db.execute(select(Turn, claimed_lately()).where(Turn.id.in_(turn_ids)))
        }
    for turn_id in turn_ids:
        turn, fresh = turns.get(turn_id, (None, False))
        if turn is None:
            click.echo(f"{turn_id}: no such turn")
        elif turn.status == QUEUED:
            send_turn(turn_id)
            click.echo(f"{turn_id}: sent again")
        elif turn.status != RUNNING:
            click.echo(f"{turn_id}: already {turn.status}")
        elif not force and (fresh or alive([turn_id])[0]):
            click.echo(f"{turn_id}: its worker is alive (use --force)")
        else:
            with transaction() as db:
                done = requeue_turn(db, turn_id, turn.attempts)
            click.echo(f"{turn_id}: {'re-queued' if done else 'changed meanwhile, left alone'}")
