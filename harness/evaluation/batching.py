"""``--batch-size auto``: the largest batch that fits the device's memory.

The per-sample cost is measured, not guessed: one forward and backward pass of the cell's attack target
on :data:`PROBE` samples, counting the bytes autograd keeps for backward (parameters excluded,
:func:`~harness.toolkit.diffusion.memory.saved_for_backward`), plus the images an attack holds per sample
(clean, current, best and gradient). That estimate times :data:`HEADROOM` (temporaries of the backward
pass, the library attacks' copies) must fit :data:`SHARE` of the free memory: ``MemAvailable`` of
``/proc/meminfo`` on the CPU (else free physical pages), ``torch.cuda.mem_get_info`` on CUDA. The result
is at least 1 and at most the cell's ``n``.

The batch size is not part of a cell's key, and it can change per-sample results: the autoattack
library draws its random starts per batch, so AutoAttack on a deterministic target depends on which
samples share a batch (PGD, with per-sample fixed starts, and targets with fixed per-sample randomness,
attacked one sample at a time by the library, do not). The default stays a fixed 128; ``auto`` is opted
into.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from harness.attacks.base import Target
from harness.data import Split
from harness.toolkit.diffusion.memory import saved_for_backward

__all__ = ["AUTO", "HEADROOM", "PROBE", "SHARE", "auto_batch_size", "free_memory", "per_sample_bytes",
           "resolve_batch_size"]

AUTO = "auto"
PROBE = 2  # samples in the measuring pass
HEADROOM = 3.0  # the measured bytes times this must fit
SHARE = 0.5  # of the free memory
IMAGE_COPIES = 4  # clean, current iterate, best iterate, gradient


def free_memory(device: torch.device) -> int:
    """Free bytes on ``device``: CUDA's free memory, else the system's available RAM."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def per_sample_bytes(target: Target, x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor,
                     exclude: list[torch.Tensor]) -> int:
    """Bytes one sample costs in an attack step on ``target``, measured on the rows of ``x``."""
    x_var = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits, held = saved_for_backward(lambda: target(x_var, indices), exclude=exclude)
        torch.autograd.grad(F.cross_entropy(logits.float(), y, reduction="sum"), x_var, allow_unused=True)
    return (held + IMAGE_COPIES * x[0].numel() * x.element_size() * len(x)) // len(x)


def auto_batch_size(target: Target, x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor, n: int,
                    exclude: list[torch.Tensor]) -> int:
    """The batch size that fits (see the module docstring), probing on the first :data:`PROBE` rows."""
    rows = slice(0, PROBE)
    cost = per_sample_bytes(target, x[rows], y[rows], indices[rows], exclude) * HEADROOM
    return max(1, min(n, int(SHARE * free_memory(x.device) // max(cost, 1))))


def resolve_batch_size(requested: int | str, target: Callable[[], Target], split: Split, todo: list[int],
                       model: nn.Module) -> int:
    """``requested``, or for ``auto`` the size that fits an attack on ``target()`` (``model``'s parameters
    not counted), probed on the first samples of ``todo`` (1 when nothing is left to do)."""
    if requested != AUTO:
        return int(requested)
    if not todo:
        return 1
    indices = torch.tensor(todo[:PROBE])
    return auto_batch_size(target(), split.float_images(indices), split.labels[indices], indices, len(todo),
                           list(model.parameters()))
