"""Efficiency inside a cell (issue 11, part 4): gradient-free passes under inference mode, the clean work
shared across cells, channels-last and bfloat16 autocast, and ``--batch-size auto``."""

from __future__ import annotations

import hashlib
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from sqlalchemy import select
from sqlalchemy.orm import Session
from torch.autograd import grad as imported_grad

from harness.classifiers.architectures import build_classifier
from harness.classifiers.sources import save_classifier
from harness.core.entry import Defense, DefenseEntry, Kind, Purifier, registry_of
from harness.core.passes import counting_gradients, gradient_free
from harness.evaluation import batching
from harness.evaluation.runner import RunRequest, run_grid
from harness.results import Cell, SampleResult, open_db


class _Plain(torch.nn.Module):
    def forward(self, x):
        return x * 2


class _Dynamic(torch.nn.Module):
    """Test-time optimisation: one gradient step inside the forward pass, taken by ``take_gradient``."""

    def __init__(self, take_gradient):
        super().__init__()
        self.take_gradient = take_gradient

    def forward(self, x):
        with torch.enable_grad():
            v = x.detach().requires_grad_(True)
            grad = self.take_gradient((v - 0.5).pow(2).sum(), v)
        return x - 0.1 * grad


def _by_attribute(loss, v):
    return torch.autograd.grad(loss, v)[0]


def _by_imported_name(loss, v):
    return imported_grad(loss, v)[0]


def _by_backward(loss, v):
    loss.backward()
    return v.grad


def test_gradient_free_uses_inference_mode_once_a_module_is_known_to_take_no_gradients():
    plain, x = _Plain(), torch.rand(2, 3)
    with gradient_free(plain):
        first = plain(x)
    with gradient_free(plain):
        second = plain(x)
    assert not first.is_inference() and second.is_inference() and torch.equal(first, second)


@pytest.mark.parametrize("take_gradient", [_by_attribute, _by_imported_name, _by_backward])
def test_gradient_free_keeps_no_grad_for_a_model_that_takes_gradients_in_its_forward(take_gradient):
    dynamic, x = _Dynamic(take_gradient), torch.rand(2, 3)
    outputs = []
    for _ in range(3):
        with gradient_free(dynamic):
            outputs.append(dynamic(x))
    assert not any(o.is_inference() for o in outputs) and all(torch.equal(o, outputs[0]) for o in outputs)


def test_counting_gradients_counts_each_backward_pass_and_restores_the_engine():
    engine = torch.autograd._engine_run_backward
    with counting_gradients() as calls:
        for take_gradient in (_by_attribute, _by_imported_name, _by_backward):
            _Dynamic(take_gradient)(torch.rand(2, 3))
    assert calls == [3] and torch.autograd._engine_run_backward is engine


# -- shared clean work ----------------------------------------------------------------------------------
CHECK_PASSES = 4  # gradient-free passes of harness.evaluation.checks on a cell's first batch
def _digest(x: torch.Tensor) -> str:
    return hashlib.sha256(x.detach().contiguous().numpy().tobytes()).hexdigest()


class _CountingBlur(Purifier):
    """A 3x3 blur that counts the gradient-free passes on each input (by content)."""

    def __init__(self, seen: Counter):
        super().__init__()
        self.seen = seen

    def forward(self, x, noise):
        if not torch.is_grad_enabled():
            self.seen[_digest(x)] += 1
        return F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)


def _blur_registry(seen: Counter):
    return registry_of(DefenseEntry(name="blur", version="1", kind=Kind.PURIFIER, paper="p", citation="c",
                                    build=lambda ctx: Defense(ctx.classifier, _CountingBlur(seen))))


def _request(classifier_file, **kw):
    base = dict(defenses=("blur",), classifier=classifier_file, n=12, batch_size=5, progress=False,
                eps=("4/255", "8/255"), attacks=({"name": "pgd", "steps": 1}, {"name": "pgd", "steps": 2}),
                protocols=("non-adaptive", "adaptive"))
    base.update(kw)
    return RunRequest(**base)


def _stored(engine):
    with Session(engine) as s:
        samples = s.execute(select(Cell.key, SampleResult.sample_index, SampleResult.clean_pred, SampleResult.adv_pred,
                                   SampleResult.perturbation).join(Cell).order_by(Cell.key, SampleResult.sample_index)
                            ).all()
        metrics = {c.key: {k: v for k, v in c.metrics.items() if k.startswith(("psnr", "ssim"))}
                   for c in s.scalars(select(Cell))}
    return samples, metrics


def _clean_batches(request):
    from harness.data import load_split
    from harness.evaluation.runner import evaluation_subset

    test = load_split("cifar10", "test")
    order = evaluation_subset(len(test.labels), request.n).tolist()
    return [_digest(test.float_images(torch.tensor(order[i:i + request.batch_size])))
            for i in range(0, len(order), request.batch_size)]


def test_clean_work_is_done_once_and_results_are_those_without_sharing(tiny_cifar, tmp_path, classifier_file):
    request = _request(classifier_file)
    shared = Counter()
    engine = open_db(str(tmp_path / "shared.db"))
    outcomes = run_grid(request, engine, _blur_registry(shared))
    assert len(outcomes) == 8 and {o.status for o in outcomes} == {"done"}
    first, *clean = _clean_batches(request)
    # one purification per clean batch for all 8 cells (clean pass and quality metrics of every cell); on the
    # first batch, each cell's evaluation-quality checks run their own 4 passes (they must: two of them
    # compare repeated passes)
    assert [shared[d] for d in clean] == [1] * len(clean) and shared[first] == 1 + 8 * CHECK_PASSES

    alone = Counter()  # every cell in a run of its own: nothing to share
    separate = open_db(str(tmp_path / "separate.db"))
    for eps in request.eps:
        for attack in request.attacks:
            for protocol in request.protocols:
                run_grid(_request(classifier_file, eps=(eps,), attacks=(attack,), protocols=(protocol,)), separate,
                         _blur_registry(alone))
    # once per cell: its quality metrics still reuse its own clean pass
    assert [alone[d] for d in clean] == [8] * len(clean) and alone[first] == 8 * (1 + CHECK_PASSES)
    assert _stored(engine) == _stored(separate)


def test_no_sharing_for_a_defense_with_hidden_randomness(tiny_cifar, tmp_path, classifier_file):
    seen = Counter()

    class Hidden(_CountingBlur):
        def forward(self, x, noise):
            return super().forward(x, noise) + 1e-3 * torch.rand_like(x)

    registry = registry_of(DefenseEntry(name="blur", version="1", kind=Kind.PURIFIER, paper="p", citation="c",
                                        build=lambda ctx: Defense(ctx.classifier, Hidden(seen))))
    request = _request(classifier_file, eps=("8/255",), attacks=({"name": "pgd", "steps": 1},))
    run_grid(request, open_db(str(tmp_path / "r.db")), registry)
    first, *rest = _clean_batches(request)
    # the checks' passes, then clean pass and quality, in each of the 2 cells
    assert seen[first] == 2 * (CHECK_PASSES + 2) and [seen[d] for d in rest] == [2 * 2] * len(rest)


# -- channels-last and bfloat16 autocast ----------------------------------------------------------------
@pytest.fixture()
def trained_file(tiny_cifar, tmp_path):
    """``convnet-tiny`` trained briefly on the tiny synthetic CIFAR-10 (well above chance)."""
    from harness.data import load_split

    train = load_split("cifar10", "train")
    x, y = train.float_images(torch.arange(len(train.labels))), train.labels
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_classifier("convnet-tiny", 10)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(60):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return str(save_classifier(model.eval(), "convnet-tiny", 10, tmp_path / "trained.safetensors"))


def _cells(outcomes):
    return {(o.protocol, o.attack): o for o in outcomes}


@pytest.mark.parametrize("setting", [{"channels_last": True}, {"autocast": "bf16"}])
def test_precision_matches_float32_accuracy_and_is_keyed_only_when_on(tiny_cifar, tmp_path, trained_file, setting):
    kw = dict(defenses=("none",), classifier=trained_file, n=40, batch_size=16, progress=False,
              attacks=({"name": "pgd", "steps": 3},), protocols=("adaptive",))
    plain = run_grid(RunRequest(**kw), open_db(str(tmp_path / "plain.db")))
    engine = open_db(str(tmp_path / "fast.db"))
    fast = run_grid(RunRequest(**kw, **setting), engine)
    (a,), (b,) = plain, fast
    assert a.clean_acc > 0.5  # a trained model, so the comparison means something
    if "channels_last" in setting:  # the same arithmetic in another memory layout
        assert abs(a.clean_acc - b.clean_acc) <= 1 / 40 and abs(a.robust_acc - b.robust_acc) <= 2 / 40
    else:  # bfloat16 has an 8-bit mantissa
        assert abs(a.clean_acc - b.clean_acc) <= 2 / 40 and abs(a.robust_acc - b.robust_acc) <= 4 / 40
    assert a.key != b.key
    with Session(engine) as s:
        config = s.scalars(select(Cell)).one().config
    assert config["precision"] == setting


def test_precision_options_on_the_command_line(tiny_cifar, tmp_path, classifier_file):
    from harness.cli.app import main

    runner = CliRunner()
    args = ["plan", "--defense", "none", "--classifier", classifier_file, "--n", "4", "--attack", "pgd:steps=1",
            "--protocol", "adaptive", "--format", "json", "--db", str(tmp_path / "r.db")]
    keys = [runner.invoke(main, args + extra).output for extra in ([], ["--channels-last"], ["--autocast", "bf16"])]
    assert len(set(keys)) == 3
    bad = runner.invoke(main, args + ["--autocast", "fp8"])
    assert bad.exit_code == 2 and "'fp8' is not 'bf16'" in bad.output


# -- batch size ---------------------------------------------------------------------------------------
def test_auto_batch_size_fits_the_free_memory(tiny_cifar, tmp_path, classifier_file, monkeypatch):
    from harness.attacks.base import Target

    model = build_classifier("convnet-tiny", 10).eval().requires_grad_(False)
    target = Target(lambda x, indices: model(x))
    x, y, idx = torch.rand(2, 3, 32, 32), torch.tensor([0, 1]), torch.arange(2)
    cost = batching.per_sample_bytes(target, x, y, idx, list(model.parameters()))
    assert cost >= batching.IMAGE_COPIES * 3 * 32 * 32 * 4
    monkeypatch.setattr(batching, "free_memory", lambda device: int(10 * cost * batching.HEADROOM / batching.SHARE))
    assert batching.auto_batch_size(target, x, y, idx, 100, list(model.parameters())) in (9, 10, 11)
    assert batching.auto_batch_size(target, x, y, idx, 4, list(model.parameters())) == 4
    monkeypatch.setattr(batching, "free_memory", lambda device: 0)
    assert batching.auto_batch_size(target, x, y, idx, 100, list(model.parameters())) == 1


def test_auto_batch_size_gives_the_results_of_a_fixed_one(tiny_cifar, tmp_path, classifier_file, monkeypatch):
    monkeypatch.setattr(batching, "free_memory", lambda device: 1)  # auto: batches of 1
    rows = []
    for name, size in (("fixed.db", 5), ("auto.db", "auto")):
        engine = open_db(str(tmp_path / name))
        run_grid(RunRequest(defenses=("none",), classifier=classifier_file, n=12, batch_size=size, progress=False,
                            attacks=({"name": "pgd", "steps": 2},), protocols=("adaptive",)), engine)
        rows.append(_stored(engine)[0])
    assert rows[0] == rows[1]


def test_bad_batch_size_is_one_line_naming_the_valid_values(tiny_cifar, tmp_path, classifier_file):
    from harness.cli.app import main

    result = CliRunner().invoke(main, ["run", "--defense", "none", "--classifier", classifier_file, "--n", "4",
                                       "--batch-size", "big", "--db", str(tmp_path / "r.db")])
    assert result.exit_code == 2 and "'big' is not a whole number >= 1 or auto" in result.output
    assert not (tmp_path / "r.db").exists()
