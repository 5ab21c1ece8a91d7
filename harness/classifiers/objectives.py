"""Training objectives: the loss hook of the classifier trainer.

* ``standard``: cross-entropy with label smoothing.
* ``pgd-at``: cross-entropy on PGD adversarial examples (Madry et al., "Towards Deep Learning Models
  Resistant to Adversarial Attacks", ICLR 2018). With one step of ``1.25 * eps`` from a uniform random
  start it is "fast" FGSM-RS training (Wong, Rice & Kolter, "Fast is better than free", ICLR 2020).
* ``trades``: ``CE(f(x), y) + beta * KL(f(x) || f(x'))`` with ``x'`` maximising that KL inside the ball
  (Zhang et al., "Theoretically Principled Trade-off between Robustness and Accuracy", ICML 2019).

The inner maximisation runs with the network in eval mode (batch-norm statistics are not updated by
attack passes, as in the TRADES reference code) and draws its random start from the trainer's generator,
so a seeded run is reproducible. An objective returns the loss, the logits on the inputs the loss
trained on (for the training accuracy), and the features of the clean and adversarial inputs that its
passes computed, for a representation-alignment term (DRA, :mod:`harness.classifiers.alignment`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from harness.core.errors import UsageError

__all__ = ["OBJECTIVES", "DEFAULT_INNER", "InnerAttack", "ObjectiveOutput", "objective_loss", "inner_attack",
           "check_objective"]

OBJECTIVES = ("standard", "pgd-at", "trades")

# eps and step_size are in [0, 1] pixel units; step_size None means 1.25 * eps / steps (FGSM-RS at steps=1)
DEFAULT_INNER: dict[str, Any] = {"eps": 8 / 255, "steps": 10, "step_size": 2 / 255, "random_start": True}


@dataclass(frozen=True)
class InnerAttack:
    """The l_inf inner maximisation of adversarial training."""

    eps: float
    steps: int
    step_size: float
    random_start: bool

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "InnerAttack":
        unknown = sorted(set(config) - set(DEFAULT_INNER))
        if unknown:
            raise UsageError(f"unknown inner-attack keys {unknown}; valid: {', '.join(DEFAULT_INNER)}")
        cfg = {**DEFAULT_INNER, **config}
        eps, steps = float(cfg["eps"]), int(cfg["steps"])
        if not 0.0 < eps <= 1.0:
            raise UsageError(f"inner attack eps must be in (0, 1], got {eps}")
        if steps < 1:
            raise UsageError(f"inner attack steps must be at least 1, got {steps}")
        step = 1.25 * eps / steps if cfg["step_size"] is None else float(cfg["step_size"])
        if step <= 0:
            raise UsageError(f"inner attack step_size must be positive, got {step}")
        return cls(eps, steps, step, bool(cfg["random_start"]))


ForwardFn = Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor | None]"]


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor
    logits: torch.Tensor  # logits on the inputs the classification loss trained on (training accuracy)
    clean_features: torch.Tensor | None  # features of the clean inputs, when the objective computed them
    adversarial_features: torch.Tensor | None  # features of the adversarial inputs, likewise


def check_objective(name: str) -> None:
    if name not in OBJECTIVES:
        raise UsageError(f"unknown training objective {name!r}; valid: {', '.join(OBJECTIVES)}")


@contextmanager
def _in_eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode, restored to its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def inner_attack(model: nn.Module, x: torch.Tensor, loss_fn, attack: InnerAttack,
                 generator: torch.Generator, start: torch.Tensor | None = None) -> torch.Tensor:
    """Maximise ``loss_fn(model(x'))`` (a summed loss) over ``x'`` in the l_inf ball around ``x`` and
    [0, 1] by signed-gradient steps; ``start`` overrides the random start."""
    with _in_eval_mode(model):
        if start is not None:
            delta = start - x
        elif attack.random_start:
            delta = (torch.rand(x.shape, generator=generator) * 2 - 1).to(x) * attack.eps
        else:
            delta = torch.zeros_like(x)
        x_adv = (x + delta).clamp(0, 1).detach()
        for _ in range(attack.steps):
            x_adv.requires_grad_(True)
            loss = loss_fn(model(x_adv))
            (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = x_adv.detach() + attack.step_size * grad.sign()
            x_adv = (x + (x_adv - x).clamp(-attack.eps, attack.eps)).clamp(0, 1).detach()
    return x_adv


def objective_loss(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                   attack: InnerAttack | None, beta: float, label_smoothing: float,
                   generator: torch.Generator, forward: ForwardFn | None = None) -> ObjectiveOutput:
    """The training loss of objective ``name`` on the batch ``(x, y)`` (model in train mode).

    ``forward(x) -> (logits, features or None)`` is the training forward pass (default: ``model`` and no
    features); the features it returns for the clean and adversarial inputs are handed back for an
    alignment term, so that term costs no extra pass. The inner attack always calls ``model`` itself.
    """
    forward = forward or (lambda inputs: (model(inputs), None))
    if name == "standard":
        logits, features = forward(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
        return ObjectiveOutput(loss, logits, features, None)
    if attack is None:
        raise UsageError(f"training objective {name!r} needs an inner attack")
    if name == "pgd-at":
        x_adv = inner_attack(model, x, lambda logits: F.cross_entropy(logits.float(), y, reduction="sum"),
                             attack, generator)
        logits, features = forward(x_adv)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
        return ObjectiveOutput(loss, logits, None, features)
    if name == "trades":
        with torch.no_grad(), _in_eval_mode(model):
            clean_prob = F.softmax(model(x).float(), dim=1)
        # TRADES starts from x + 0.001 * N(0, 1) (a zero start has zero KL gradient)
        start = (x + 0.001 * torch.randn(x.shape, generator=generator).to(x)).clamp(0, 1)
        kl_sum = lambda logits: F.kl_div(F.log_softmax(logits.float(), dim=1), clean_prob, reduction="sum")
        x_adv = inner_attack(model, x, kl_sum, attack, generator, start=start)
        (clean_logits, clean_features), (adv_logits, adv_features) = forward(x), forward(x_adv)  # two passes, as TRADES
        natural = F.cross_entropy(clean_logits.float(), y, label_smoothing=label_smoothing)
        robust = F.kl_div(F.log_softmax(adv_logits.float(), dim=1), F.softmax(clean_logits.float(), dim=1),
                          reduction="batchmean")
        return ObjectiveOutput(natural + beta * robust, clean_logits, clean_features, adv_features)
    check_objective(name)
    raise AssertionError(name)  # pragma: no cover
