"""Schema version 3: the rough edges of schema 2, fixed on every back end.

- ``samples.index`` (an SQL keyword, quoted everywhere) becomes ``samples.sample_index``, its unique
  constraint named ``uq_samples_cell_id_sample_index``.
- Times are timezone-aware: ``TIMESTAMP WITH TIME ZONE`` on PostgreSQL, the stored naive values read as
  UTC (which harness wrote). SQLite has no time zones: its values, UTC text, stay as they are.
- Documents are ``JSONB`` on PostgreSQL (``JSON`` stays on SQLite).

On SQLite the samples table is rebuilt (SQLite renames columns, not constraints: copied, dropped,
renamed back); the whole revision runs in the caller's transaction on both back ends.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None
#: the schema version this revision leaves the store at (harness.results.schema.SCHEMA_VERSION)
schema_version = 3

TIMES = (("runs", "started_at", False), ("runs", "finished_at", True), ("cells", "started_at", False),
         ("cells", "finished_at", True), ("analyses", "created_at", False), ("claims", "claimed_at", False),
         ("claims", "heartbeat_at", False))
DOCUMENTS = (("runs", "packages", False), ("cells", "config", False), ("cells", "metrics", False),
             ("samples", "extra", True), ("analyses", "config", False), ("analyses", "result", False))
NEW_UNIQUE = "uq_samples_cell_id_sample_index"
#: the name schema 2's unnamed constraint gets back on a downgrade (PostgreSQL's name for it)
OLD_UNIQUE = "samples_cell_id_index_key"


def _samples(name: str, position: str, unique: str) -> sa.Table:
    """The samples table, called ``name``, with the sample's position in column ``position`` (its index
    on ``cell_id`` is made separately, under the final name)."""
    metadata = sa.MetaData()
    sa.Table("cells", metadata, sa.Column("id", sa.Integer, primary_key=True))
    return sa.Table(
        name, metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("cell_id", sa.Integer, sa.ForeignKey("cells.id", ondelete="CASCADE"), nullable=False),
        sa.Column(position, sa.Integer, nullable=False),
        sa.Column("label", sa.Integer, nullable=False),
        sa.Column("clean_pred", sa.Integer, nullable=False),
        sa.Column("adv_pred", sa.Integer, nullable=False),
        sa.Column("perturbation", sa.Float, nullable=False),
        sa.Column("extra", sa.JSON),
        sa.UniqueConstraint("cell_id", position, name=unique),
    )


def _set_schema_version(version: int) -> None:
    info = sa.table("store_info", sa.column("key", sa.String), sa.column("value", sa.Text))
    op.execute(info.delete().where(info.c.key == "schema_version"))
    op.execute(info.insert().values(key="schema_version", value=str(version)))


def _unique_on(columns: set[str]) -> str | None:
    """The name of the unique constraint of ``samples`` on exactly ``columns``, if any."""
    for constraint in sa.inspect(op.get_bind()).get_unique_constraints("samples"):
        if set(constraint["column_names"]) == columns:
            return constraint["name"]
    return None


def _rename_position(old: str, new: str, new_unique: str) -> None:
    """Rename the samples' position column ``old`` -> ``new``, and its unique constraint (whatever its
    name) to ``new_unique``."""
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":  # rebuilt: SQLite renames columns, not constraints
        rebuilt = _samples("_samples_rebuilt", new, new_unique)
        rebuilt.create(bind)
        columns = [c.name for c in rebuilt.columns]
        sources = [old if c == new else c for c in columns]
        quote = bind.dialect.identifier_preparer.quote
        op.execute(f"INSERT INTO _samples_rebuilt ({', '.join(map(quote, columns))}) "
                   f"SELECT {', '.join(map(quote, sources))} FROM samples")
        op.drop_table("samples")
        op.rename_table("_samples_rebuilt", "samples")
        op.create_index("ix_samples_cell_id", "samples", ["cell_id"])
        return
    current = _unique_on({"cell_id", old})
    op.alter_column("samples", old, new_column_name=new, existing_type=sa.Integer(), existing_nullable=False)
    if bind.dialect.name == "postgresql" and current:  # its index is renamed with it
        preparer = bind.dialect.identifier_preparer
        op.execute(f"ALTER TABLE samples RENAME CONSTRAINT {preparer.quote(current)} TO {preparer.quote(new_unique)}")
        return
    if current:
        op.drop_constraint(current, "samples", type_="unique")
    op.create_unique_constraint(new_unique, "samples", ["cell_id", new])


def upgrade() -> None:
    _rename_position("index", "sample_index", NEW_UNIQUE)
    if op.get_bind().dialect.name == "postgresql":
        for table, column, nullable in TIMES:
            op.alter_column(table, column, type_=sa.DateTime(timezone=True), existing_type=sa.DateTime(),
                            existing_nullable=nullable, postgresql_using=f"{column} AT TIME ZONE 'UTC'")
        for table, column, nullable in DOCUMENTS:
            op.alter_column(table, column, type_=JSONB(), existing_type=sa.JSON(), existing_nullable=nullable,
                            postgresql_using=f"{column}::jsonb")
    _set_schema_version(schema_version)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table, column, nullable in DOCUMENTS:
            op.alter_column(table, column, type_=sa.JSON(), existing_type=JSONB(), existing_nullable=nullable,
                            postgresql_using=f"{column}::json")
        for table, column, nullable in TIMES:
            op.alter_column(table, column, type_=sa.DateTime(), existing_type=sa.DateTime(timezone=True),
                            existing_nullable=nullable, postgresql_using=f"{column} AT TIME ZONE 'UTC'")
    # the unnamed constraint of schema 2 gets a name on the way back (SQLite and PostgreSQL both accept it)
    _rename_position("sample_index", "index", OLD_UNIQUE)
    _set_schema_version(2)
