"""Question sets: questions stored once, each with a key and what it
expects (shared/expectations.py), run as replays on an assistant and the
runs compared (web/comparisons.py).

A run copies each question's key and expectations into its items, so a run
is judged by what its set said when it ran; two runs are matched question
by question through the keys.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, func, insert, select
from sqlalchemy.orm import Session

from shared.models import QuestionSet, Replay, SetQuestion
from shared.replays import create_replay


def store_questions(db: Session, qset: QuestionSet, questions: list[dict[str, Any]]) -> None:
    """Make `questions` (each `message`, `key`?, `expect`?) the set's, in
    order; a question without a key is keyed by its place, from 1."""
    db.execute(delete(SetQuestion).where(SetQuestion.set_id == qset.id))
    db.execute(
        insert(SetQuestion),
        [
            {
                "set_id": qset.id,
                "index": i,
                "key": q.get("key") or str(i + 1),
                "message": q["message"],
                "expect": q.get("expect") or None,
            }
            for i, q in enumerate(questions)
        ],
    )
    qset.size, qset.updated_at = len(questions), func.now()


def questions_of(db: Session, set_id: str) -> list[SetQuestion]:
    return list(db.scalars(select(SetQuestion).where(SetQuestion.set_id == set_id).order_by(SetQuestion.index)))


def run_set(
    db: Session,
    qset: QuestionSet,
    concurrency: int,
    assistant: tuple[str, int] | None,
    repeats: int = 1,
    schedule_id: str | None = None,
) -> Replay:
    """A replay of the set: every question `repeats` times, the whole set
    once before the next repeat, each in a session of its own."""
    questions = questions_of(db, qset.id)
    items = [
        {"message": q.message, "key": q.key, "expect": q.expect, "repeat": r} for r in range(repeats) for q in questions
    ]
    return create_replay(
        db, qset.owner_id, items, concurrency, assistant, set_id=qset.id, repeats=repeats, schedule_id=schedule_id
    )


def set_json(qset: QuestionSet, questions: list[SetQuestion] | None = None) -> dict[str, Any]:
    data = {
        "id": qset.id,
        "name": qset.name,
        "description": qset.description,
        "size": qset.size,
        "created_at": qset.created_at.isoformat(),
        "updated_at": qset.updated_at.isoformat(),
    }
    if questions is not None:
        data["questions"] = [{"key": q.key, "message": q.message, "expect": q.expect} for q in questions]
    return data
