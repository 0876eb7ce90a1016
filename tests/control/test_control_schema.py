"""The migrations build exactly the schema the models describe (no drift either way)."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from trustplane.control.db import make_engine
from trustplane.control.migrate import upgrade
from trustplane.control.models import Base


def test_the_migrations_build_the_models_schema(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'schema.db'}")
    try:
        upgrade(engine)
        with engine.connect() as connection:
            differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
        assert differences == []
        assert "volume_operations" in inspect(engine).get_table_names()
    finally:
        engine.dispose()
