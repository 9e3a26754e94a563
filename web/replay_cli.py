"""Operator commands for evaluation: `flask --app web replay FILE | replay
--set NAME | replay compare A B` and `sets import/list`."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import click
from flask import Blueprint
from sqlalchemy import select
from tqdm import tqdm

from shared.config import get_settings
from shared.db import transaction
from shared.models import Owner, QuestionSet, Replay
from shared.question_sets import run_set, set_json, store_questions
from shared.replays import create_replay, item_rows, result_line, summary
from shared.turn_states import ENDED
from web.cli import OperatorCommand, OperatorGroup, assistant_named, is_uuid

bp = Blueprint("replay_cli", __name__, cli_group=None)

# Exit codes besides 0 (2 is click's, for a bad argument or input file):
# a question failed (`replay`) or regressed (`replay compare`); out of time.
EXIT_FAILED, EXIT_TIMEOUT = 1, 3
_OWNER = click.option("--owner", default="local", show_default=True, help="The owner's name.")


class RunByDefault(OperatorGroup):
    """`replay FILE …` (or `replay --set NAME …`) is `replay run …`; the
    group's other commands are named."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@bp.cli.group("replay", cls=RunByDefault)
def replay_group() -> None:
    """Replay questions (`replay FILE` or `replay --set NAME`), or compare runs (`replay compare A B`)."""


@replay_group.command("run")
@click.argument("file", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--set", "set_name", help="Run this question set (instead of FILE).")
@click.option("--repeats", default=1, show_default=True, type=click.IntRange(1, 10), help="With --set.")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--owner", default="local", show_default=True, help="Owner the sessions belong to.")
@click.option("--concurrency", default=4, show_default=True, type=click.IntRange(1, 100))
@click.option("--timeout", default=3600.0, show_default=True, help="Seconds to wait for the whole batch.")
@click.option("--assistant", metavar="NAME[@VERSION]", help="Who answers every question (default: each session's).")
def replay(
    file: Path | None,
    set_name: str | None,
    repeats: int,
    out: Path,
    owner: str,
    concurrency: int,
    timeout: float,
    assistant: str | None,
) -> None:
    """Submit one turn per line of FILE (JSON: {"message", "session_id"?}),
    or per question of the set --set names, show progress, write one result
    line per question to --out (with a set's, its checks). Exits 1 if any
    question failed (a set's: did not pass), 3 if the batch did not finish
    within --timeout (2 is a bad argument or input file)."""
    from web.auth import get_or_create_owner

    if (file is None) == (set_name is None):
        raise click.UsageError("give FILE or --set")
    questions = _read_questions(file) if file is not None else None
    with transaction() as db:
        owner_id = get_or_create_owner(db, owner).id
        chosen = None
        if assistant is not None:
            name, _, version = assistant.rpartition("@") if "@" in assistant else (assistant, "", "")
            found = assistant_named(db, owner, name)
            if version and not (version.isdigit() and 1 <= int(version) <= found.versions):
                raise click.BadParameter(f"{found.name} has versions 1 to {found.versions}", param_hint="--assistant")
            chosen = (found.id, int(version) if version else found.latest)
        if questions is None:
            made = run_set(db, _set_named(db, owner, set_name), concurrency, chosen, repeats)
        else:
            made = create_replay(db, owner_id, questions, concurrency, chosen)
        replay_id, total = made.id, len(questions) if questions else None
        db.flush()
        total = total or summary(db, made)["total"]
    click.echo(f"replay {replay_id}: {total} questions", err=True)
    deadline = time.monotonic() + timeout
    with _progress(total) as show:
        while True:
            with transaction() as db:
                state = summary(db, db.get(Replay, replay_id))
            show(state["succeeded"] + state["failed"], state["failed"])
            if state["status"] == "finished" or time.monotonic() > deadline:
                break
            time.sleep(0.25)
    unfinished = not_passed = 0
    with transaction() as db, out.open("w") as fh:
        for item, turn in item_rows(db, [replay_id]):
            line = result_line(item, turn)
            fh.write(json.dumps(line) + "\n")
            unfinished += turn is None or turn.status not in ENDED
            not_passed += line["passed"] is False
    passed = f", {state['passed']} passed" if set_name else ""
    click.echo(
        f"{state['succeeded']} succeeded, {state['failed']} failed{passed}, {unfinished} unfinished -> {out}", err=True
    )
    if unfinished:
        sys.exit(EXIT_TIMEOUT)
    if not_passed:
        sys.exit(EXIT_FAILED)


@replay_group.command("compare", cls=OperatorCommand)
@click.argument("baseline")
@click.argument("candidate")
@click.option("--html", type=click.Path(dir_okay=False, path_type=Path), help="Write the HTML report here.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Write the JSON here.")
@click.option("--csv", "csv_out", type=click.Path(dir_okay=False, path_type=Path), help="Write the CSV here.")
def compare_runs(baseline: str, candidate: str, html: Path | None, json_out: Path | None, csv_out: Path | None) -> None:
    """Compare runs of a question set: BASELINE and CANDIDATE are replay
    ids, each side one or several joined by commas (repeated runs). Prints
    the totals; exits 1 when a question regressed (for CI)."""
    from web.comparisons import compare, refusal
    from web.reports import to_csv, to_html, to_json

    with transaction() as db:
        sides = [_replays(db, ids) for ids in (baseline, candidate)]
        refused = refusal(*sides)
        if refused:
            raise click.UsageError(refused[1])
        data = compare(db, *sides)
    for path, render in ((json_out, to_json), (csv_out, to_csv), (html, lambda c: to_html(c)[0])):
        if path is not None:
            path.write_text(render(data))
    click.echo(_totals_text(data))
    if data["changes"]["regressed"]:
        sys.exit(EXIT_FAILED)


def _replays(db, ids: str) -> list[Replay]:
    found = []
    for ident in filter(None, (i.strip() for i in ids.split(","))):
        replay = db.get(Replay, ident) if is_uuid(ident) else None
        if replay is None:
            raise click.BadParameter(f"no replay {ident!r}")
        found.append(replay)
    return found


def _totals_text(data: dict) -> str:
    def pct(value):
        return "-" if value is None else f"{value * 100:.1f}%"

    b, c, d = data["baseline"], data["candidate"], data["difference"]["pass_rate"]
    ci = d["ci95"]
    noise = "" if ci is None else f" (95% interval {ci[0] * 100:+.1f} to {ci[1] * 100:+.1f} points)"
    lines = [
        f"pass rate {pct(b['pass_rate'])} -> {pct(c['pass_rate'])}{noise}",
        f"p50 latency {b['p50_latency_ms']} -> {c['p50_latency_ms']} ms, p95 {b['p95_latency_ms']} -> "
        f"{c['p95_latency_ms']} ms, tokens per question {_round(b['mean_tokens'])} -> {_round(c['mean_tokens'])}",
        ", ".join(f"{n} {change}" for change, n in data["changes"].items() if n) or "no questions",
    ]
    return "\n".join(lines)


def _round(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


@bp.cli.group("sets", cls=OperatorGroup)
def sets_group() -> None:
    """Question sets: questions with expectations, to replay and compare."""


@sets_group.command("import")
@click.argument("name")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_OWNER
@click.option("--description", default="", help="What the set is for.")
def sets_import(name: str, file: Path, owner: str, description: str) -> None:
    """Store FILE's questions (JSON lines: {"message", "key"?, "expect"?})
    as the owner's set NAME, replacing its questions if it exists."""
    from web.auth import get_or_create_owner
    from web.errors import ApiError
    from web.question_sets import set_questions
    from web.validation import QuestionSetBody, validate

    lines = []
    for n, line in enumerate(file.read_text().splitlines(), 1):
        if line.strip():
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                raise click.BadParameter(f"line {n} is not JSON: {exc}", param_hint="FILE") from None
            lines.append({"message": data} if isinstance(data, str) else data)
    try:
        body = validate(QuestionSetBody, {"name": name, "description": description, "questions": lines})
        questions = set_questions(body, get_settings().max_message_chars)
    except ApiError as exc:
        raise click.BadParameter(str(exc), param_hint="FILE") from None
    with transaction() as db:
        owner_id = get_or_create_owner(db, owner).id
        qset = db.scalar(select(QuestionSet).where(QuestionSet.owner_id == owner_id, QuestionSet.name == name))
        if qset is None:
            qset = QuestionSet(owner_id=owner_id, name=name, description=description, size=0)
            db.add(qset)
            db.flush()
        qset.description = description or qset.description
        store_questions(db, qset, questions)
        db.flush()
        db.refresh(qset)
        click.echo(json.dumps(set_json(qset), indent=2))


@sets_group.command("list")
@_OWNER
def sets_list(owner: str) -> None:
    """The owner's sets: id, name, questions."""
    with transaction() as db:
        rows = db.scalars(
            select(QuestionSet)
            .join(Owner, Owner.id == QuestionSet.owner_id)
            .where(Owner.name == owner)
            .order_by(QuestionSet.name)
        ).all()
    if not rows:
        click.echo(f"{owner} has no question sets: make one with `sets import NAME FILE`")
        return
    for s in rows:
        click.echo(f"{s.id:36}  {s.name:32}  {s.size} questions")


def _sets_of(owner: str):
    return select(QuestionSet).join(Owner, Owner.id == QuestionSet.owner_id).where(Owner.name == owner)


def _set_named(db, owner: str, name: str) -> QuestionSet:
    found = db.scalar(
        select(QuestionSet)
        .join(Owner, Owner.id == QuestionSet.owner_id)
        .where(Owner.name == owner, QuestionSet.name == name)
    )
    if found is None:
        raise click.BadParameter(f"{owner} has no question set {name!r} (`sets list` shows them)", param_hint="--set")
    return found


@contextmanager
def _progress(total: int) -> Iterator[Callable[[int, int], None]]:
    """A progress bar on a terminal; elsewhere (a log, a pipe) a plain line
    when the count changes, at most every 5 seconds, and at the end."""
    if sys.stderr.isatty():
        with tqdm(total=total, unit="q", file=sys.stderr) as bar:

            def show(done: int, failed: int) -> None:
                bar.update(done - bar.n)
                bar.set_postfix(failed=failed)

            yield show
        return
    last = {"done": -1, "at": 0.0}

    def show(done: int, failed: int) -> None:
        now = time.monotonic()
        if done != last["done"] and (now - last["at"] >= 5 or done == total):
            click.echo(f"{done}/{total} done, {failed} failed", err=True)
            last.update(done=done, at=now)

    yield show


def _read_questions(file: Path) -> list[dict]:
    questions = []
    for n, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise click.BadParameter(f"line {n} is not JSON: {exc}", param_hint="FILE") from None
        if isinstance(data, str):
            data = {"message": data}
        if not isinstance(data, dict) or not isinstance(data.get("message"), str) or not data["message"].strip():
            raise click.BadParameter(f'line {n} needs a non-empty "message"', param_hint="FILE")
        questions.append({"message": data["message"].strip(), "session_id": data.get("session_id")})
    if not questions:
        raise click.BadParameter("the file holds no questions", param_hint="FILE")
    return questions
