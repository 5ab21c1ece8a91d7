"""Baseline: the tables of schema version 2 (harness 0.2.0), as that release created them.

A store of harness 0.2.0 (``store_info`` says schema version 2, no ``alembic_version``) is stamped with
this revision, not run through it. Run, it creates the tables that are missing, so it also completes a
store of harness 0.1 (which had no ``claims`` and ``store_info``), and builds an empty database from
nothing.

Revision ID: 0001
Revises: -
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None
#: the schema version this revision leaves the store at (harness.results.schema.SCHEMA_VERSION)
schema_version = 2


def tables() -> sa.MetaData:
    """The schema-2 tables, frozen: naive datetimes, generic JSON, the sample's position in ``index``."""
    metadata = sa.MetaData()
    sa.Table(
        "runs", metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("started_at", sa.DateTime, nullable=False),
        sa.Column("finished_at", sa.DateTime),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("command", sa.Text, nullable=False),
        sa.Column("git_commit", sa.String(64), nullable=False),
        sa.Column("git_dirty", sa.Boolean, nullable=False),
        sa.Column("harness_version", sa.String(32), nullable=False),
        sa.Column("packages", sa.JSON, nullable=False),
        sa.Column("device", sa.String(64), nullable=False),
        sa.Column("host", sa.String(128), nullable=False),
    )
    sa.Table(
        "cells", metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("key", sa.String(64), nullable=False, unique=True, index=True),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id")),
        sa.Column("defense", sa.String(128), nullable=False, index=True),
        sa.Column("defense_version", sa.String(32), nullable=False),
        sa.Column("preset", sa.String(64), nullable=False),
        sa.Column("classifier", sa.String(256), nullable=False),
        sa.Column("dataset", sa.String(64), nullable=False, index=True),
        sa.Column("dataset_fingerprint", sa.String(64), nullable=False),
        sa.Column("data_source", sa.Text, nullable=False),
        sa.Column("variant", sa.String(128), nullable=False),
        sa.Column("threat", sa.String(8), nullable=False),
        sa.Column("eps", sa.Float, nullable=False),
        sa.Column("eps_text", sa.String(32), nullable=False),
        sa.Column("attack", sa.String(64), nullable=False),
        sa.Column("attack_label", sa.String(64), nullable=False),
        sa.Column("protocol", sa.String(32), nullable=False, index=True),
        sa.Column("n", sa.Integer, nullable=False),
        sa.Column("seed", sa.Integer, nullable=False),
        sa.Column("config", sa.JSON, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("n_done", sa.Integer, nullable=False),
        sa.Column("clean_acc", sa.Float),
        sa.Column("robust_acc", sa.Float),
        sa.Column("avg_acc", sa.Float),
        sa.Column("metrics", sa.JSON, nullable=False),
        sa.Column("seconds", sa.Float, nullable=False),
        sa.Column("error", sa.Text, nullable=False),
        sa.Column("started_at", sa.DateTime, nullable=False),
        sa.Column("finished_at", sa.DateTime),
    )
    sa.Table(
        "samples", metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("cell_id", sa.Integer, sa.ForeignKey("cells.id", ondelete="CASCADE"), nullable=False, index=True),
        sa.Column("index", sa.Integer, nullable=False),
        sa.Column("label", sa.Integer, nullable=False),
        sa.Column("clean_pred", sa.Integer, nullable=False),
        sa.Column("adv_pred", sa.Integer, nullable=False),
        sa.Column("perturbation", sa.Float, nullable=False),
        sa.Column("extra", sa.JSON),
        sa.UniqueConstraint("cell_id", "index"),
    )
    sa.Table(
        "analyses", metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("key", sa.String(64), nullable=False, unique=True, index=True),
        sa.Column("kind", sa.String(64), nullable=False, index=True),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id")),
        sa.Column("config", sa.JSON, nullable=False),
        sa.Column("result", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    sa.Table(
        "claims", metadata,
        sa.Column("cell_key", sa.String(64), primary_key=True),
        sa.Column("owner", sa.String(128), nullable=False),
        sa.Column("claimed_at", sa.DateTime, nullable=False),
        sa.Column("heartbeat_at", sa.DateTime, nullable=False),
    )
    sa.Table(
        "store_info", metadata,
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )
    return metadata


def set_schema_version(version: int) -> None:
    """Record ``version`` in ``store_info`` (in the migration's transaction)."""
    info = sa.table("store_info", sa.column("key", sa.String), sa.column("value", sa.Text))
    op.execute(info.delete().where(info.c.key == "schema_version"))
    op.execute(info.insert().values(key="schema_version", value=str(version)))


def upgrade() -> None:
    tables().create_all(op.get_bind(), checkfirst=True)
    set_schema_version(schema_version)


def downgrade() -> None:
    tables().drop_all(op.get_bind(), checkfirst=True)
