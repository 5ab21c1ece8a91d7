"""The DRA paper's representation analyses: effective rank, top-k SAE loss, the diffusion-feature probe,
their CLI commands (rows in the results DB) and their tables in `harness report`. Tiny data only."""

from __future__ import annotations

import torch
import pytest
from click.testing import CliRunner
from sqlalchemy.orm import Session

from harness.analysis.diffusion_probe import LinearProbe, probe_robustness, train_probe
from harness.analysis.representations import (RepresentationsRequest, SAESettings, effective_rank, run_representations,
                                              sae_loss, train_sae)
from harness.cli import main
from harness.core.entry import Defense, DefenseEntry, Kind
from harness.core.registry import Registry
from harness.core.threat import Epsilon, ThreatModel
from harness.results import open_db
from harness.results.queries import load_analyses, new_run, save_analysis


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_effective_rank_of_hand_made_matrices():
    g = _gen()
    rank_one = torch.randn(200, 1, generator=g) @ torch.randn(1, 30, generator=g)
    assert effective_rank(rank_one) == pytest.approx(1.0, abs=1e-4)
    for k in (2, 5, 9):
        basis, _ = torch.linalg.qr(torch.randn(24, k, generator=g))  # k orthonormal directions in R^24
        signs = torch.cat([torch.eye(k), -torch.eye(k)])  # zero mean, equal variance along each direction
        assert effective_rank(signs @ basis.T + 3.0) == pytest.approx(k, rel=1e-6)  # the offset is centred away
    unequal = torch.cat([torch.eye(2), -torch.eye(2)]) * torch.tensor([1.0, 0.1])
    assert 1.0 < effective_rank(unequal) < 1.5
    assert effective_rank(torch.ones(5, 3)) == 0.0


def test_topk_sae_reconstructs_sparse_features_much_better_than_dense_ones():
    g = _gen(1)
    dim, atoms, k = 32, 64, 4
    dictionary = torch.randn(atoms, dim, generator=g)
    dictionary /= dictionary.norm(dim=1, keepdim=True)

    def sparse(n: int) -> torch.Tensor:
        codes = torch.zeros(n, atoms)
        active = torch.rand(n, atoms, generator=g).argsort(dim=1)[:, :k]
        return codes.scatter(1, active, torch.rand(n, k, generator=g) + 0.5) @ dictionary

    settings = SAESettings(latents=atoms, k=k, steps=300, batch_size=256, lr=1e-2)
    sparse_sae = train_sae(sparse(2048), settings)
    dense_sae = train_sae(torch.randn(2048, dim, generator=g), settings)
    on_sparse = sae_loss(*sparse_sae, sparse(512))["nmse"]
    on_dense = sae_loss(*dense_sae, torch.randn(512, dim, generator=g))["nmse"]
    assert on_sparse < 0.2 and on_dense > 0.4 and on_sparse < on_dense / 3
    codes = sparse_sae[0].encode(sparse_sae[1](sparse(16)))
    assert ((codes != 0).sum(dim=1) <= k).all()
    # the loss is invariant to the scale of the features (one scalar normalisation per entry)
    scaled = train_sae(1000 * torch.randn(2048, dim, generator=_gen(2)), settings)
    same = train_sae(torch.randn(2048, dim, generator=_gen(2)), settings)
    probe = torch.randn(256, dim, generator=_gen(3))
    assert sae_loss(*scaled, 1000 * probe)["nmse"] == pytest.approx(sae_loss(*same, probe)["nmse"], rel=1e-3)


def test_probe_robustness_of_a_linear_model_is_bounded_by_clean_accuracy():
    """A probe on raw pixel means: an l_inf attack of eps shifts every mean by up to eps, so points near
    the decision boundary fall; robust accuracy never exceeds clean accuracy."""
    from harness.data.disk import Split

    class _Info:
        num_classes = 2

    g = _gen(4)
    labels = torch.arange(64) % 2
    images = (0.4 + 0.05 * labels.view(-1, 1, 1, 1) + 0.04 * torch.randn(64, 3, 4, 4, generator=g)).clamp(0, 1)
    split = Split(_Info(), "test", (images * 255).round().to(torch.uint8), labels, "f", "s")  # type: ignore[arg-type]

    def features(x, idx):
        return x.mean(dim=(2, 3))

    probe = train_probe(features(split.float_images(), None), labels, 2, steps=200)
    threat = ThreatModel("linf", Epsilon.parse("8/255"))
    weak = probe_robustness(features, probe, split, torch.arange(64), {"name": "pgd", "steps": 0}, threat, 0)
    strong = probe_robustness(features, probe, split, torch.arange(64), {"name": "pgd", "steps": 10}, threat, 0)
    assert weak["clean_acc"] > 0.8 and weak["robust_acc"] <= weak["clean_acc"]
    assert strong["robust_acc"] < weak["robust_acc"] and strong["max_perturbation"] <= 8 / 255 + 1e-6
    assert isinstance(probe, LinearProbe)


def _registry(classifier_file: str) -> Registry[DefenseEntry]:
    """The real ``none`` entry plus a classifier entry with its own (untrained) network."""
    from harness.classifiers.architectures import build_classifier
    from harness.core.entry import defense_registry

    def build(ctx):
        with torch.random.fork_rng():
            torch.manual_seed(1)
            return Defense(build_classifier("convnet-tiny", 10))

    registry: Registry[DefenseEntry] = Registry("defense", expects=DefenseEntry)
    registry.add("none", defense_registry().get("none"))
    registry.add("own", DefenseEntry(name="own", version="1", kind=Kind.CLASSIFIER, paper="p", citation="c",
                                     build=build))
    return registry


TINY_SAE = SAESettings(latents=32, k=4, steps=20, batch_size=32)


def test_representations_rows_for_classifier_and_undefended_entries(tiny_cifar, classifier_file, tmp_path):
    engine = open_db(str(tmp_path / "r.db"))
    request = RepresentationsRequest(defenses=("none", "own"), classifier=classifier_file, n=40, train_n=60,
                                     sae=TINY_SAE, progress=False)
    keys = run_representations(request, engine, registry=_registry(classifier_file))
    assert len(keys) == 2
    with Session(engine) as session:
        rows = {a.config["defense"]: a for a in load_analyses(session, "representations")}
        assert rows["none"].run.status == "done"
    assert rows["none"].config["network"] != rows["own"].config["network"]
    for row in rows.values():
        assert row.config["sae"]["latents"] == 32 and row.config["sae"]["k"] == 4 and row.config["n"] == 40
        assert 1.0 <= row.result["effective_rank"] <= row.result["feature_dim"]
        assert 0.0 <= row.result["sae_loss"] < 2.0
    # the same request replaces its rows rather than adding new ones
    run_representations(request, engine, registry=_registry(classifier_file))
    with Session(engine) as session:
        assert len(load_analyses(session, "representations")) == 2


def test_cli_stores_rows_and_report_shows_both_tables(tiny_cifar, classifier_file, tmp_path):
    db, out = tmp_path / "results.db", tmp_path / "out"
    runner = CliRunner()
    result = runner.invoke(main, ["analyse", "representations", "--defense", "none", "--classifier", classifier_file,
                                  "--n", "40", "--train-n", "60", "--latents", "32", "--k", "4", "--sae-steps", "20",
                                  "--no-progress", "--db", str(db)])
    assert result.exit_code == 0, result.output
    probe = runner.invoke(main, ["analyse", "diffusion-probe", "--classifier", classifier_file, "--ddpm-preset", "tiny",
                                 "--timestep", "10", "--n", "6", "--train-n", "40", "--probe-steps", "20",
                                 "--attack", "pgd:steps=2", "--batch-size", "4", "--no-progress", "--db", str(db)])
    assert probe.exit_code == 0, probe.output
    engine = open_db(str(db))
    with Session(engine) as session:
        rows = load_analyses(session, "diffusion-probe")
        assert {r.config["representation"] for r in rows} == {"diffusion", "classifier"}
        for r in rows:
            assert r.config["attack"]["steps"] == 2 and r.config["eps"] == "8/255" and r.config["train_n"] == 40
            assert 0 <= r.result["robust_acc"] <= r.result["clean_acc"] <= 1
        diffusion = next(r for r in rows if r.config["representation"] == "diffusion")
        assert diffusion.config["features"]["timestep"] == 10 and diffusion.config["features"]["block"] == "mid"
        # a hostile name in a stored row is escaped in the page
        run = new_run(session, "test", {})
        save_analysis(session, "representations", {"defense": "<script>x</script>", "sae": {}, "n": 1},
                      {"effective_rank": 1.0, "feature_dim": 2, "sae_loss": 0.5}, run.id)
    report = runner.invoke(main, ["report", "--db", str(db), "--out", str(out)])
    assert report.exit_code == 0, report.output
    page = (out / "index.html").read_text()
    assert "Representations" in page and "Diffusion-feature probe" in page
    assert "<script>x</script>" not in page and "&lt;script&gt;" in page
    assert "32 latents, k=4" in page and "DDPM tiny" in page and "PGD-2" in page
    markdown = (out / "representations.md").read_text()
    assert "| none |" in markdown and "diffusion" in markdown


@pytest.mark.parametrize("args,expected", [
    (["representations", "--defense", "nope"], "unknown defense 'nope'; valid for representations:"),
    (["representations", "--defense", "none,maep"], "defense 'maep' is a purifier"),
    (["representations", "--defense", "none", "--k", "64", "--latents", "32"], "cannot exceed"),
    (["diffusion-probe", "--block", "middle"], "valid: down.0, down.1, down.2, mid, up.0, up.1, up.2"),
    (["diffusion-probe", "--pool", "sum"], "valid: avg, max"),
    (["diffusion-probe", "--representation", "pixels"], "valid: diffusion, classifier"),
    (["diffusion-probe", "--timestep", "1000"], "outside the schedule's 0..999"),
])
def test_bad_input_is_one_line_naming_valid_choices(harness_home, tmp_path, args, expected):
    result = CliRunner().invoke(main, ["analyse", *args, "--db", str(tmp_path / "x.db")])
    assert result.exit_code != 0
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and expected in errors[0], result.output
    assert "Traceback" not in result.output
    if "valid" in expected and "representations" in args:
        assert "none" in errors[0]
    assert not (tmp_path / "x.db").exists()  # bad input creates no store
