"""Passes that need no gradients: under ``torch.inference_mode`` whenever that is safe.

``inference_mode`` is ``no_grad`` without view tracking and version counters, so it is cheaper, but a
tensor created under it can never enter autograd, and a model that takes gradients inside its own
forward pass (test-time optimisation: ScoreOpt, gradient-guided diffusion) cannot run under it at all.
:func:`gradient_free` therefore runs the first pass of each owner (a defense, a target) under
``no_grad`` while counting the gradient computations made inside it; if there were none, every later
pass of that owner runs under ``inference_mode``, else under ``no_grad``. Both give the same numbers.

Callers keep only predictions, logits or images that no autograd graph will see later; a result that
could be differentiated afterwards must be computed under ``torch.no_grad`` instead.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Iterator

import torch

__all__ = ["counting_gradients", "gradient_free"]

#: per owner, whether its passes may run under inference mode (absent: not known yet)
_inference_safe: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def counting_gradients() -> Iterator[list[int]]:
    """Count the backward passes run inside the block (in this process; harness evaluates in one thread).

    Counted at ``torch.autograd._engine_run_backward``, where ``torch.autograd.grad``, ``torch.autograd.backward``
    and ``Tensor.backward`` all end: a plugin that imported ``grad`` by name is counted too."""
    calls = [0]
    engine = torch.autograd._engine_run_backward

    def counted(*args, **kwargs):
        calls[0] += 1
        return engine(*args, **kwargs)

    torch.autograd._engine_run_backward = counted
    try:
        yield calls
    finally:
        torch.autograd._engine_run_backward = engine


@contextlib.contextmanager
def gradient_free(owner: Any) -> Iterator[None]:
    """A block of passes of ``owner`` (weak-referenceable: a module, a target) that need no gradients:
    ``inference_mode`` once ``owner`` is known to take no gradients in its forward pass, ``no_grad``
    (and finding that out) before."""
    known = _inference_safe.get(owner)
    if known:
        with torch.inference_mode():
            yield
        return
    if known is False:
        with torch.no_grad():
            yield
        return
    with counting_gradients() as calls, torch.no_grad():
        yield
    _inference_safe[owner] = calls[0] == 0
