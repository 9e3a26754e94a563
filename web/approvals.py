"""Tool calls a person approves: list a turn's, decide one."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, g, jsonify
from jsonschema import exceptions as schema_errors
from jsonschema import validators
from sqlalchemy import select

from shared import metrics
from shared.approvals import APPROVED, REJECTED, DecisionRefused, decide
from shared.db import transaction
from shared.models import ToolApproval, Turn
from shared.turns import lock_session
from web import schemas
from web.errors import ApiError
from web.openapi import operation
from web.resources import iso, owned, valid_id
from web.validation import Decision, parse_body

bp = Blueprint("approvals", __name__)


def approval_json(approval: ToolApproval) -> dict[str, Any]:
    return {
        "id": approval.id,
        "turn_id": approval.turn_id,
        "call_id": approval.call_id,
        "name": approval.name,
        "server": approval.server,
        "tool": approval.tool,
        "arguments": approval.arguments,
        "status": approval.status,
        "decided_by": approval.decided_by,
        "decided_at": iso(approval.decided_at),
        "decided_arguments": approval.decided_arguments,
        "message": approval.message,
        "always": approval.always,
        "deadline": iso(approval.deadline),
        "created_at": iso(approval.created_at),
    }


@bp.get("/api/turns/<turn_id>/approvals")
@operation("The tool calls of a turn a person was asked to decide, oldest first", {200: schemas.ToolApprovalList})
def list_approvals(turn_id: str):
    with transaction() as db:
        turn = owned(db, Turn, turn_id)
        rows = db.scalars(
            select(ToolApproval)
            .where(ToolApproval.turn_id == turn.id)
            .order_by(ToolApproval.created_at, ToolApproval.call_id)
        ).all()
        return jsonify({"items": [approval_json(row) for row in rows]})


@bp.post("/api/turns/<turn_id>/approvals/<request_id>")
@operation(
    "Decide a tool call the turn waits on: approve (as asked, or with edited arguments), or reject with a"
    " message the model receives; the step's last decision lets the turn go on",
    {200: schemas.ToolApproval},
    body=Decision,
    errors=(409,),
)
def decide_call(turn_id: str, request_id: str):
    body = parse_body(Decision)
    if body.decision == "reject" and (body.arguments is not None or body.always):
        raise ApiError(422, "arguments and always go with an approval", {"field": "decision"})
    if body.decision == "approve" and body.message is not None:
        raise ApiError(422, "a message goes with a rejection", {"field": "message"})
    with transaction() as db:
        turn = owned(db, Turn, turn_id)
        approval = db.get(ToolApproval, valid_id(request_id))
        if approval is None or approval.turn_id != turn.id:
            raise ApiError(404, "no such approval request for this turn")
        if lock_session(db, turn.session_id, g.owner_id) is None:
            raise ApiError(404, "no such turn")
        db.refresh(turn)  # as it is now that its session is locked
        db.refresh(approval)
        if body.arguments is not None:
            _check(body.arguments, approval.input_schema)
        status = APPROVED if body.decision == "approve" else REJECTED
        try:
            decide(
                db,
                turn,
                approval,
                status,
                g.caller,
                arguments=body.arguments,
                message=body.message,
                always=body.always,
            )
        except DecisionRefused as exc:
            raise ApiError(409, str(exc)) from None
        data = approval_json(approval)
    metrics.TOOL_DECISIONS.labels(status).inc()
    return jsonify(data)


def _check(arguments: dict[str, Any], schema: dict[str, Any]) -> None:
    """422 unless `arguments` fit the tool's input schema."""
    try:
        checker = validators.validator_for(schema)(schema)
        error = schema_errors.best_match(checker.iter_errors(arguments))
    except schema_errors.SchemaError:  # the tool's own schema is broken: the tool will say what it takes
        return
    if error is not None:
        where = ".".join(str(p) for p in error.absolute_path)
        raise ApiError(
            422,
            f"arguments{'.' + where if where else ''}: {error.message} (the tool's input schema)",
            {"field": "arguments" + (f".{where}" if where else "")},
        )
