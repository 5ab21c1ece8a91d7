"""The fixed-randomness analyses on toy purifiers whose answers are known in closed form."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from harness.analysis import (analyse, compression_rates, gain_table, load_records, randomness_spread,
                              save_record, scatter_points)
from harness.report.randomness import compression_scatter, report_sections
from harness.results import open_db

SHAPE = (3, 8, 8)


def shrink(x, noise):
    """P(x) = 0.5 + 0.25 (x - 0.5) + noise: kappa = 0.25 exactly (away from the clipping range)."""
    return 0.5 + 0.25 * (x - 0.5) + 0.1 * noise.randn(x.shape[1:])


def images(n=4):
    return 0.3 + 0.4 * torch.rand((n, *SHAPE), generator=torch.Generator().manual_seed(0))


def test_compression_of_a_contraction_is_exact():
    x, idx = images(), torch.arange(4)
    stats = compression_rates(shrink, x, idx, seed=0, radii=(2 / 255, 8 / 255), x_adv=x + 4 / 255)
    assert {(s.norm, s.kind) for s in stats} >= {("l2", "random"), ("linf", "random"), ("linf", "adversarial")}
    for s in stats:
        assert s.kappa == pytest.approx(0.25, rel=1e-4) and s.compression == pytest.approx(0.75, rel=1e-4)


def test_spread_dominated_by_noise_and_records_are_reproducible(tmp_path):
    x, idx = images(), torch.arange(4)
    stats = randomness_spread(shrink, x, idx, seeds=(0, 1, 2), radius=8 / 255)
    assert all(s.across_seeds > s.across_inputs and s.ratio > 1 for s in stats)
    first = analyse(shrink, x, idx, x_adv=(x + 8 / 255).clamp(0, 1))
    assert first == analyse(shrink, x, idx, x_adv=(x + 8 / 255).clamp(0, 1))
    assert all(d["farther"] for d in first["distances"])  # the noise dominates: finding (a)


def _cells():
    rows = []
    for defense, options, fixed, fresh in (("none", "", 0.0, 0.0), ("diffpure", "", 0.2, 0.6),
                                           ("diffpure", '{"options":{"tstar":0.2}}', 0.3, 0.7),
                                           ("dda", "", 0.05, 0.3)):
        for protocol, acc in (("adaptive", fixed), ("adaptive-eot", fresh), ("non-adaptive", 0.8)):
            for attack, delta in (("PGD-20", 0.0), ("PGD-10", 0.05)):
                rows.append(dict(status="done", protocol=protocol, attack_label=attack, robust_acc=acc + delta,
                                 dataset="cifar10", classifier="c", threat="linf", eps_text="8/255",
                                 defense=defense, preset="small" if defense != "none" else None,
                                 entry_kind="undefended" if defense == "none" else "purifier",
                                 defense_options=options, variant="clean"))
    # results on a dataset variant never enter the gain table
    rows.append(dict(rows[-1], defense="diffpure", defense_options="", protocol="adaptive", robust_acc=0.0,
                     variant="colored"))
    return pd.DataFrame(rows)


def test_gain_table_scatter_and_sections(tmp_path):
    engine = open_db(str(tmp_path / "results.db"))
    table = gain_table(_cells(), {"none"})
    assert len(table) == 3 and set(table["defense"]) == {"diffpure", "dda"}
    row = table[(table["defense"] == "diffpure") & (table["defense_options"] == "")].iloc[0]
    assert row["fixed"] == pytest.approx(0.2) and row["fresh"] == pytest.approx(0.6)  # strongest attack
    assert row["gain_fixed"] == pytest.approx(0.2) and row["gain_fresh"] == pytest.approx(0.6)
    for defense, options, compression in (("diffpure", "", 0.5), ("diffpure", '{"options":{"tstar":0.2}}', 0.7),
                                          ("dda", "", 0.1)):
        meta = {"defense": defense, "preset": "small", "options": {"tstar": 0.2} if options else {},
                "dataset": "cifar10"}
        record = {"compression": [{"norm": "linf", "kind": "random", "radius": 8 / 255, "kappa": 1 - compression,
                                   "compression": compression}]}
        save_record(engine, meta, record)
        save_record(engine, meta, record)  # the same setting again replaces its record
    records = load_records(engine)
    points = scatter_points(table, records)
    assert len(records) == 3 and len(points) == 3
    path, r = compression_scatter(points, tmp_path / "out" / "scatter.png")
    assert path.is_file() and r > 0.9
    sections = report_sections(table, records, tmp_path / "out")
    assert [s.images for s in sections][1] == ("figures/compression_vs_gain_8-255.png",)
    assert scatter_points(table, records, eps_text="4/255") == []  # no 4/255 cells: no points
    assert "<table" in str(sections[0].html) and "20.00" in str(sections[0].html)
    _, nan_r = compression_scatter(points[:1], tmp_path / "one.png")
    assert math.isnan(nan_r)


def test_analysis_rows_are_keyed_by_kind_and_config(tmp_path):
    from sqlalchemy.orm import Session

    from harness.results import Analysis

    from harness.results.queries import load_analyses, new_run, save_analysis

    engine = open_db(str(tmp_path / "results.db"))
    with Session(engine) as session:
        run = new_run(session, "harness analyse", {"git_commit": "abc", "harness_version": "0.1", "packages": {}})
        first = save_analysis(session, "fixed-randomness", {"defense": "dda", "options": {"scale": 2}},
                              {"n": 1}, run.id)
        again = save_analysis(session, "fixed-randomness", {"options": {"scale": 2}, "defense": "dda"},
                              {"n": 2}, run.id)
        other = save_analysis(session, "other-kind", {"defense": "dda", "options": {"scale": 2}}, {"n": 3})
        assert first.key == again.key != other.key and session.query(Analysis).count() == 2
        [row] = load_analyses(session, "fixed-randomness")
        assert row.result == {"n": 2} and row.run.git_commit == "abc" and row.created_at is not None


def test_the_analyses_table_shows_distances_spread_and_compression_per_norm():
    from harness.report.randomness import analysis_table

    record = {"n": 32, "eps": "8/255",
              "distances": [{"norm": "linf", "adversarial": 0.03, "purified_adversarial": 0.41,
                             "purified_clean": 0.40, "farther": True}],
              "spread": [{"norm": "linf", "across_seeds": 0.45, "across_inputs": 0.02, "ratio": 22.5}],
              "compression": [{"norm": "linf", "kind": "random", "radius": 4 / 255, "compression": 0.9},
                              {"norm": "linf", "kind": "random", "radius": 8 / 255, "compression": 0.42},
                              {"norm": "linf", "kind": "adversarial", "radius": 0.03, "compression": 0.05},
                              {"norm": "l2", "kind": "random", "radius": 8 / 255, "compression": 0.86}]}
    meta = {"defense": "diffpure", "preset": "small", "options": {"tstar": 0.2}, "dataset": "cifar10"}
    table = analysis_table([{"meta": meta, "record": record}]).set_index("norm")
    assert list(table.index) == ["l2", "linf"]
    linf = table.loc["linf"]
    assert (linf["options"], linf["farther"], linf["seeds / inputs"]) == ("tstar=0.2", "yes", 22.5)
    assert linf["compression (random, eps)"] == 0.42 and linf["compression (adversarial)"] == 0.05
    l2 = table.loc["l2"]
    assert l2["farther"] == "–" and l2["compression (random, eps)"] == 0.86 and pd.isna(l2["adversarial"])
