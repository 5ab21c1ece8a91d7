"""Clean work shared by the cells of one defense.

Several cells of a grid evaluate one built defense on the same clean batches with the same fixed
noise: several attacks, epsilons or protocols on one defense, data (variant), seed and samples. Their
clean pass (the logits of the clean batch) and the purified clean images (the image-quality metrics)
are then the same numbers, so :class:`SharingDefense` computes them once and hands the kept tensors to
the next cell. A pass is shared only when it is the very same computation: gradients off, on the batch
the runner marked as the clean one (unchanged since), with fixed-noise draws not yet used; its key is
the data, the noise (seed, namespace, sample indices: one batch) and the pass. Anything else (attack
iterations, adversarial images, fresh noise) runs as usual, so stored results are those without sharing.

A defense whose cell is flagged ``randomness`` (it draws randomness outside its noise argument) is not
shared: repeating it would not repeat its numbers. Kept tensors are bounded by :data:`BUDGET_BYTES`
(least recently used dropped first).
"""

from __future__ import annotations

import contextlib
import weakref
from collections import OrderedDict
from typing import Any, Callable, Hashable, Iterator

import torch

from harness.core.entry import Defense
from harness.core.noise import NoiseDraws
from harness.evaluation.guards import CheckedDefense

__all__ = ["BUDGET_BYTES", "CleanWork", "SharingDefense", "shared_defense"]

#: at most this many bytes of clean results are kept per defense (512 MiB; CIFAR-10's 512 images
#: purified take 6 MiB)
BUDGET_BYTES = 512 * 2 ** 20


class CleanWork:
    """Tensors by key, least recently used dropped beyond ``budget`` bytes; counts what it computed."""

    def __init__(self, budget: int = BUDGET_BYTES):
        self.budget = budget
        self.computed = 0  # passes computed here
        self.reused = 0  # passes handed out again
        self._kept: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self._bytes = 0

    def get(self, key: Hashable, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The tensor kept under ``key``, else ``compute()`` (kept if it fits the budget)."""
        if key in self._kept:
            self._kept.move_to_end(key)
            self.reused += 1
            return self._kept[key]
        out = compute()
        self.computed += 1
        size = out.numel() * out.element_size()
        if size <= self.budget:
            self._kept[key] = out
            self._bytes += size
            while self._bytes > self.budget:
                _, dropped = self._kept.popitem(last=False)
                self._bytes -= dropped.numel() * dropped.element_size()
        return out


class SharingDefense(CheckedDefense):
    """A :class:`CheckedDefense` whose gradient-free passes on the marked clean batch (see
    :meth:`sharing`) come from its :class:`CleanWork`."""

    def __init__(self, defense: Defense, num_classes: int):
        super().__init__(defense, num_classes)
        self.work = CleanWork()
        self.shareable = True  # off for good once a check finds randomness outside the noise argument
        self._clean: tuple[torch.Tensor, int, Hashable] | None = None

    def stop_sharing(self) -> None:
        """Never share again (the defense draws randomness of its own: two passes are not one)."""
        self.shareable = False
        self.work = CleanWork()

    @contextlib.contextmanager
    def sharing(self, x: torch.Tensor, data: Hashable, enabled: bool = True) -> Iterator[None]:
        """Inside the block, passes on ``x`` (a clean batch of the data named ``data``) are shared."""
        self._clean = (x, x._version, data) if enabled and self.shareable else None
        try:
            yield
        finally:
            self._clean = None

    def _key(self, what: str, x: torch.Tensor, noise: Any) -> Hashable | None:
        if self._clean is None or torch.is_grad_enabled() or not isinstance(noise, NoiseDraws):
            return None
        clean, version, data = self._clean
        if x is not clean or x._version != version or noise.key is None:
            return None
        return what, data, noise.key

    def purify(self, x: torch.Tensor, noise: Any) -> torch.Tensor:
        key = self._key("purify", x, noise)
        if key is None:
            return super().purify(x, noise)
        return self.work.get(key, lambda: CheckedDefense.purify(self, x, noise))

    def forward(self, x: torch.Tensor, noise: Any) -> torch.Tensor:
        key = self._key("logits", x, noise)
        if key is None:
            return super().forward(x, noise)
        return self.work.get(key, lambda: CheckedDefense.forward(self, x, noise))


_shared: "weakref.WeakKeyDictionary[Defense, dict[Hashable, SharingDefense]]" = weakref.WeakKeyDictionary()


def shared_defense(defense: Defense, num_classes: int, variant: Hashable = None,
                   wrap: Callable[[Defense], Defense] | None = None) -> SharingDefense:
    """The one :class:`SharingDefense` of the built ``defense`` (``wrap``-ped first, e.g. for a precision;
    ``variant`` names the wrapping), kept as long as ``defense`` lives, so every cell of it shares."""
    by_variant = _shared.setdefault(defense, {})
    if (variant, num_classes) not in by_variant:
        by_variant[variant, num_classes] = SharingDefense(wrap(defense) if wrap else defense, num_classes)
    return by_variant[variant, num_classes]
