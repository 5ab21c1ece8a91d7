"""PSNR / SSIM / l_p distances of harness.evaluation.metrics."""

from __future__ import annotations

import math

import pytest
import torch

from harness.evaluation.metrics import PSNR_CAP, lp_distance, psnr, quality, ssim


@pytest.fixture()
def images() -> torch.Tensor:
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_identical_images_psnr_capped_ssim_one(images):
    assert torch.equal(psnr(images, images), torch.full((4,), PSNR_CAP))
    assert torch.allclose(ssim(images, images), torch.ones(4), atol=1e-6)
    assert torch.equal(lp_distance(images, images, 2), torch.zeros(4))


def test_psnr_matches_definition(images):
    noisy = (images + 0.05 * torch.randn(images.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    mse = (noisy - images).pow(2).flatten(1).mean(1)
    assert torch.allclose(psnr(noisy, images), -10 * torch.log10(mse), atol=1e-4)
    assert (ssim(noisy, images) < 0.99).all()


def test_uint8_step_is_below_cap():
    x = torch.zeros(1, 1, 16, 16)
    assert psnr(x + 1 / 255, x).item() == pytest.approx(20 * math.log10(255), abs=1e-3)


def test_lp_distances(images):
    delta = torch.zeros_like(images)
    delta[:, 0, 0, 0] = 0.3
    delta[:, 1, 2, 2] = -0.4
    assert torch.allclose(lp_distance(images + delta, images, 2), torch.full((4,), 0.5))
    assert torch.allclose(lp_distance(images + delta, images, "linf"), torch.full((4,), 0.4))
    assert set(quality(images + delta, images)) == {"psnr", "ssim", "l2", "linf"}


def test_shape_mismatch_rejected(images):
    with pytest.raises(ValueError):
        psnr(images, images[:2])


# --- per-cell quality and the report pieces built on it ----------------------------------------------

def test_batch_quality_and_resumable_means(images):
    from harness.evaluation.metrics import batch_quality, merge_quality
    from harness.core.noise import FixedNoise
    from harness.core.entry import Defense

    defense = Defense(torch.nn.Flatten())  # identity purifier
    x_adv = (images + 4 / 255).clamp(0, 1)
    x_adv[1] = images[1]  # left unattacked: not part of the adversarial means
    batch = batch_quality(defense, images, x_adv, FixedNoise(0), torch.arange(4))
    assert torch.equal(batch["psnr_clean"], torch.full((4,), PSNR_CAP))
    assert len(batch["psnr_adv"]) == 3 and (batch["psnr_adv"] < 50).all() and (batch["ssim_adv"] < 1).all()
    halves = merge_quality(merge_quality({}, {k: v[:1] for k, v in batch.items()}),
                           {k: v[1:] for k, v in batch.items()})
    whole = merge_quality(None, batch)
    assert halves["quality"]["counts"] == {"psnr_clean": 4, "ssim_clean": 4, "psnr_adv": 3, "ssim_adv": 3}
    nothing = batch_quality(defense, images, images.clone(), FixedNoise(0), torch.arange(4))
    assert "psnr_adv" not in merge_quality({}, nothing) and len(nothing["ssim_adv"]) == 0
    for name in batch:
        assert halves[name] == pytest.approx(whole[name]) == pytest.approx(batch[name].mean().item())


def _cells():
    import pandas as pd

    rows = []
    for defense, base in (("none", 0.9), ("maep", 0.8)):
        for variant, drop in (("clean", 0.0), ("colored", 0.2), ("corrupt:contrast:3", 0.1),
                              ("corrupt:contrast:5", 0.3), ("corrupt:saturate:5", 0.05)):
            for seed in (0, 1):
                rows.append({
                    "defense": defense, "preset": "small", "classifier": "trained:small", "dataset": "cifar10",
                    "protocol": "non-adaptive", "attack_label": "PGD-20", "eps_text": "8/255", "status": "done",
                    "variant": variant, "seed": seed, "clean_acc": base - drop, "robust_acc": 0.5 - drop / 2,
                    "avg_acc": (base - drop + 0.5 - drop / 2) / 2,
                    "config": {"defense": {"train_dataset": "cifar100"}} if defense == "maep" else {},
                    "metric_psnr_clean": 30.0 + seed, "metric_ssim_clean": 0.9, "metric_psnr_adv": 28.0,
                    "metric_ssim_adv": 0.8})
    return pd.DataFrame(rows)


def test_report_tables(tmp_path):
    import pandas as pd

    from harness.report.quality import color_shift_table, corruption_frame, quality_table, transfer_table

    cells = _cells()
    quality = quality_table(cells)
    assert list(quality["psnr_clean"]) == [30.5, 30.5] and set(quality["defense"]) == {"none", "maep"}
    shift = color_shift_table(cells).set_index("defense")
    assert shift.loc["none", "clean_acc"] == 90.0 and shift.loc["none", "clean_drop"] == 20.0
    assert shift.loc["maep", "robust_drop"] == 10.0
    curve = corruption_frame(cells)
    contrast = curve[(curve["defense"] == "none") & (curve["corruption"] == "contrast")]
    assert list(contrast["severity"]) == [0, 3, 5] and list(contrast["clean_acc"]) == [90.0, 80.0, 60.0]
    # settings without corrupted cells (another dataset, another protocol) get no severity-0 point
    other = cells[cells["variant"] == "clean"].assign(dataset="fashion-mnist")
    adaptive = cells[cells["variant"] == "clean"].assign(protocol="adaptive")
    curve = corruption_frame(pd.concat([cells, other, adaptive], ignore_index=True))
    assert set(curve["dataset"]) == {"cifar10"} and set(curve["protocol"]) == {"non-adaptive"}
    assert len(curve) == 2 * 5  # two defenses x (contrast at 0, 3, 5 + saturate at 0, 5)
    transfer = transfer_table(cells).set_index("defense")
    assert transfer.loc["maep", "train_dataset"] == "cifar100" and transfer.loc["none", "train_dataset"] == "cifar10"
    # the same purifier trained on the evaluation dataset is another row, never averaged with it
    native = cells[cells["defense"] == "maep"].assign(config=[{}] * 10, clean_acc=0.0)
    shift = color_shift_table(pd.concat([cells, native], ignore_index=True))
    maep = shift[shift["defense"] == "maep"].set_index("train_dataset")
    assert maep.loc["cifar100", "clean_acc"] == 80.0 and maep.loc["cifar10", "clean_acc"] == 0.0


def test_report_sections_render(tmp_path):
    import pandas as pd

    from harness.report.html import render_html
    from harness.report.quality import quality_sections

    sections = quality_sections(_cells(), tmp_path)
    assert len(sections) == 4
    assert (tmp_path / "figures" / "color_shift.png").stat().st_size > 1000
    assert (tmp_path / "figures" / "corruptions.png").stat().st_size > 1000
    page = render_html([], pd.DataFrame(columns=["status"]), extra_sections=sections)
    assert "figures/corruptions.png" in page and "Table 1" in page
    assert quality_sections(_cells().iloc[:0], tmp_path) == []
