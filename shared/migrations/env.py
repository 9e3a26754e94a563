"""Alembic environment: the URL comes from shared.config, not from alembic.ini."""

from alembic import context

from shared.db import get_engine
from shared.models import Base


def run_migrations() -> None:
    with get_engine().connect() as connection:
        context.configure(connection=connection, target_metadata=Base.metadata, compare_type=True)
        with context.begin_transaction():
            context.run_migrations()


run_migrations()
