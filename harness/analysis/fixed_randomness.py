"""The fixed-randomness analyses of Liu & Wei, "How Do Diffusion Models Improve Adversarial
Robustness?" (arXiv 2505.22839), for any purifier ``purify(x, noise_draws)``.

* :func:`distances_to_clean` -- finding (a): is ``P(x_adv)`` closer to the clean x than ``x_adv`` is?
* :func:`randomness_spread` -- finding (b): outputs for one input across noise seeds vs outputs for
  one seed across inputs. [reconstructed] "inputs" are the image and random perturbations of it
  within the threat-model ball (the region a purifier must map to one class).
* :func:`compression_rates` -- the compression rate ``1 - kappa``, ``kappa = ||P(x+d) - P(x)||_p /
  ||d||_p`` with the purifier's noise fixed (same per-sample draws for both calls), for random ``d``
  of several radii and, optionally, adversarial ``d``.

Every random draw (perturbation directions included) comes from :class:`harness.core.noise.FixedNoise`,
so results are reproducible and independent of batch composition.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch

from harness.core.noise import FixedNoise, NoiseDraws
from harness.core.passes import gradient_free

__all__ = ["NORMS", "DistanceStats", "SpreadStats", "CompressionStats", "distances_to_clean",
           "randomness_spread", "compression_rates", "random_perturbation", "analyse"]

NORMS = ("l2", "linf")
Purify = Callable[[torch.Tensor, NoiseDraws], torch.Tensor]


def _norm(v: torch.Tensor, norm: str) -> torch.Tensor:
    flat = v.flatten(1)
    return flat.norm(dim=1) if norm == "l2" else flat.abs().amax(dim=1)


@dataclass(frozen=True)
class DistanceStats:
    """Mean distance to the clean image of the adversarial input and of purified images."""

    norm: str
    adversarial: float  # ||x_adv - x||
    purified_adversarial: float  # ||P(x_adv) - x||
    purified_clean: float  # ||P(x) - x||

    @property
    def farther(self) -> bool:
        """Finding (a): purification moves the adversarial input farther from the clean image."""
        return self.purified_adversarial > self.adversarial


@dataclass(frozen=True)
class SpreadStats:
    """Mean pairwise output distance across noise seeds (one input) and across inputs (one seed)."""

    norm: str
    across_seeds: float
    across_inputs: float

    @property
    def ratio(self) -> float:
        return self.across_seeds / max(self.across_inputs, 1e-12)


@dataclass(frozen=True)
class CompressionStats:
    """``kappa`` averaged over images and directions; ``compression = 1 - kappa``."""

    norm: str
    kind: str  # "random" | "adversarial"
    radius: float  # the requested radius (mean actual radius for adversarial perturbations)
    kappa: float
    compression: float


def _gradient_free(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn(purify, ...)`` run under :func:`~harness.core.passes.gradient_free` of the purifier (inference
    mode unless it takes gradients in its forward pass)."""
    @functools.wraps(fn)
    def wrapper(purify: Purify, *args: Any, **kwargs: Any) -> Any:
        with gradient_free(getattr(purify, "__self__", purify)):
            return fn(purify, *args, **kwargs)
    return wrapper


@_gradient_free
def distances_to_clean(purify: Purify, x: torch.Tensor, x_adv: torch.Tensor, indices: torch.Tensor,
                       seed: int) -> list[DistanceStats]:
    """Finding (a), with the evaluation noise of ``seed`` (the same per-sample draws for both calls)."""
    noise = FixedNoise(seed)
    p_adv, p_clean = purify(x_adv, noise.draws(indices)), purify(x, noise.draws(indices))
    return [DistanceStats(n, _norm(x_adv - x, n).mean().item(), _norm(p_adv - x, n).mean().item(),
                          _norm(p_clean - x, n).mean().item()) for n in NORMS]


def random_perturbation(x: torch.Tensor, draws: NoiseDraws, radius: float, norm: str) -> torch.Tensor:
    """``x + d`` clipped to [0, 1], ``d`` a random direction with ``||d||_norm = radius`` (a random
    vertex of the l_inf ball, or a uniformly random direction on the l_2 sphere)."""
    direction = draws.randn(x.shape[1:], device=x.device, dtype=x.dtype)
    if norm == "linf":
        d = radius * direction.sign()
    else:
        d = radius * direction / _norm(direction, "l2").clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))
    return (x + d).clamp(0, 1)


def _mean_pairwise(outputs: list[torch.Tensor], norm: str) -> float:
    pairs = list(itertools.combinations(outputs, 2))
    return torch.stack([_norm(a - b, norm) for a, b in pairs]).mean().item()


@_gradient_free
def randomness_spread(purify: Purify, x: torch.Tensor, indices: torch.Tensor, seeds: Sequence[int],
                      radius: float, norm: str = "linf", n_inputs: int = 4) -> list[SpreadStats]:
    """Finding (b) for both norms; inputs are x and ``n_inputs - 1`` random perturbations of radius
    ``radius`` in ``norm`` (their draws from the ``spread-inputs`` namespace of ``seeds[0]``)."""
    if len(seeds) < 2 or n_inputs < 2:
        raise ValueError("the spread needs at least two seeds and two inputs")
    inputs_noise = FixedNoise(seeds[0], namespace="spread-inputs").draws(indices)
    inputs = [x] + [random_perturbation(x, inputs_noise, radius, norm) for _ in range(n_inputs - 1)]
    out = {(s, k): purify(xi, FixedNoise(s).draws(indices)) for s in seeds for k, xi in enumerate(inputs)}
    stats = []
    for n in NORMS:
        seeds_spread = sum(_mean_pairwise([out[s, k] for s in seeds], n) for k in range(n_inputs)) / n_inputs
        inputs_spread = sum(_mean_pairwise([out[s, k] for k in range(n_inputs)], n) for s in seeds) / len(seeds)
        stats.append(SpreadStats(n, seeds_spread, inputs_spread))
    return stats


def _kappa(p_x: torch.Tensor, p_xd: torch.Tensor, x: torch.Tensor, xd: torch.Tensor, norm: str) -> torch.Tensor:
    moved = _norm(xd - x, norm)
    keep = moved > 0
    return _norm(p_xd - p_x, norm)[keep] / moved[keep]


@_gradient_free
def compression_rates(purify: Purify, x: torch.Tensor, indices: torch.Tensor, seed: int,
                      radii: Sequence[float], directions: int = 2,
                      x_adv: torch.Tensor | None = None) -> list[CompressionStats]:
    """Compression rates with the purifier's noise fixed by ``seed``, for every norm and radius
    (``directions`` random perturbations per image), plus the adversarial perturbation if given."""
    noise = FixedNoise(seed)
    p_x = purify(x, noise.draws(indices))
    stats = []
    for norm, radius in itertools.product(NORMS, radii):
        dirs = FixedNoise(seed, namespace=f"compression-{norm}-{radius}").draws(indices)
        kappas = []
        for _ in range(directions):
            xd = random_perturbation(x, dirs, radius, norm)
            kappas.append(_kappa(p_x, purify(xd, noise.draws(indices)), x, xd, norm))
        kappa = torch.cat(kappas).mean().item()
        stats.append(CompressionStats(norm, "random", float(radius), kappa, 1 - kappa))
    if x_adv is not None:
        p_adv = purify(x_adv, noise.draws(indices))
        for norm in NORMS:
            kappa = _kappa(p_x, p_adv, x, x_adv, norm).mean().item()
            stats.append(CompressionStats(norm, "adversarial", _norm(x_adv - x, norm).mean().item(),
                                          kappa, 1 - kappa))
    return stats


def analyse(purify: Purify, x: torch.Tensor, indices: torch.Tensor, *, seed: int = 0,
            radii: Sequence[float] = (2 / 255, 4 / 255, 8 / 255), spread_seeds: Sequence[int] = (0, 1, 2),
            spread_radius: float = 8 / 255, x_adv: torch.Tensor | None = None) -> dict[str, Any]:
    """All three analyses as one JSON-able record (distances only when ``x_adv`` is given)."""
    record: dict[str, Any] = {
        "n": len(x), "seed": seed,
        "compression": [asdict(s) for s in compression_rates(purify, x, indices, seed, radii, x_adv=x_adv)],
        "spread": [dict(asdict(s), ratio=s.ratio)
                   for s in randomness_spread(purify, x, indices, spread_seeds, spread_radius)],
    }
    if x_adv is not None:
        record["distances"] = [dict(asdict(s), farther=s.farther)
                               for s in distances_to_clean(purify, x, x_adv, indices, seed)]
    return record
