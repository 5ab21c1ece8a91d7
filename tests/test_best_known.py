"""Best-known robust accuracy: the per-sample worst case over the attacks of one setting."""

from __future__ import annotations

import pytest

from harness.analysis.best_known import best_known


def _cell(key: str, attack: str, seed: int = 0, protocol: str = "adaptive") -> dict:
    config = {"defense": {"name": "d"}, "classifier": "c", "dataset": {"name": "x"}, "threat": {"eps": 0.03},
              "attack": {"name": attack}, "protocol": protocol, "n": 4, "seed": seed}
    return {"cell_key": key, "config": config, "attack_label": attack}


def test_a_sample_counts_only_if_it_survived_every_attack():
    cells = [_cell("a", "PGD-20"), _cell("b", "APGD-CE"), _cell("c", "PGD-20", seed=1)]
    # index: label, clean, adv ; sample 0 survives both, 1 breaks under a only, 2 under b only, 3 is misclassified
    samples = [("a", 0, 1, 1, 1), ("a", 1, 1, 1, 0), ("a", 2, 1, 1, 1), ("a", 3, 1, 0, 0),
               ("b", 0, 1, 1, 1), ("b", 1, 1, 1, 1), ("b", 2, 1, 1, 2), ("b", 3, 1, 0, 0),
               ("c", 0, 1, 1, 1), ("c", 1, 1, 1, 1), ("c", 2, 1, 1, 1), ("c", 3, 1, 1, 1)]
    known = best_known(cells, samples)
    assert known["a"] is known["b"]  # one setting
    assert known["a"].accuracy == pytest.approx(1 / 4)
    assert known["a"].broken == {"PGD-20": 1, "APGD-CE": 1} and known["a"].only == {"PGD-20": 1, "APGD-CE": 1}
    assert known["c"].accuracy == 1.0  # another seed is another setting
    each = [sum(adv == label and clean == label for k, _, label, clean, adv in samples if k == key) / 4
            for key in ("a", "b")]
    assert known["a"].accuracy <= min(each)  # never above any single attack


def test_protocols_are_separate_settings():
    cells = [_cell("a", "PGD-20"), _cell("b", "PGD-20", protocol="non-adaptive")]
    samples = [("a", 0, 1, 1, 0), ("b", 0, 1, 1, 1)]
    known = best_known(cells, samples)
    assert known["a"].accuracy == 0.0 and known["b"].accuracy == 1.0
