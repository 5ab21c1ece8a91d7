"""The results store: analysis records written by harness 0.1 get the canonical key on open."""

from __future__ import annotations

import hashlib
import json

from sqlalchemy.orm import Session

from harness.results import Analysis, open_db
from harness.results.queries import analysis_key, load_analyses, save_analysis


def _old_key(kind: str, config: dict) -> str:
    """How harness 0.1 keyed analyses: JSON with the default separators (spaces)."""
    return hashlib.sha256(json.dumps({"kind": kind, "config": config}, sort_keys=True, default=str)
                          .encode()).hexdigest()


def test_old_analysis_keys_become_canonical_and_are_found_again(tmp_path):
    db = str(tmp_path / "r.db")
    config = {"defense": "diffpure", "options": {"tstar": 0.2}}
    with Session(open_db(db)) as session:
        session.add(Analysis(key=_old_key("fixed-randomness", config), kind="fixed-randomness", config=config,
                             result={"n": 3}))
        session.commit()
    assert _old_key("fixed-randomness", config) != analysis_key("fixed-randomness", config)
    with Session(open_db(db)) as session:
        [row] = load_analyses(session, "fixed-randomness")
        assert row.key == analysis_key("fixed-randomness", config) and row.result == {"n": 3}
        save_analysis(session, "fixed-randomness", config, {"n": 4})
        [row] = load_analyses(session, "fixed-randomness")  # replaced, not duplicated
        assert row.result == {"n": 4}
