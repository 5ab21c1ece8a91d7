"""The resumable state of a training run: one file, rewritten atomically after every epoch.

It holds the network, the projection head and EMA copies, the optimiser and scheduler states, the random
generators and the epoch reached, so a killed run resumes where it stopped and ends with the weights of an
uninterrupted one. It is written with :func:`torch.save` (to a temporary file, then renamed) and read
with ``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers: loading a
checkpoint never runs code from it.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from harness.core.errors import UsageError

__all__ = ["TrainingCheckpoint"]

FORMAT = 1


class TrainingCheckpoint:
    """The checkpoint file at ``path``; with ``path=None`` every method is a no-op (no checkpointing).
    ``tag`` (e.g. the recipe hash) must match on resume, so one recipe never resumes another's run."""

    def __init__(self, path: str | os.PathLike | None, tag: str = ""):
        self.path = Path(path) if path is not None else None
        self.tag = tag

    def exists(self) -> bool:
        return self.path is not None and self.path.is_file()

    def save(self, epoch: int, seconds: float, modules: Mapping[str, nn.Module | None],
             optimizer: torch.optim.Optimizer, scheduler: Any, generators: Mapping[str, torch.Generator],
             queue: list[torch.Tensor]) -> None:
        """Write the state after ``epoch`` epochs (``queue``: the trainer's pending synthetic order)."""
        if self.path is None:
            return
        state = {"format": FORMAT, "tag": self.tag, "epoch": int(epoch), "seconds": float(seconds),
                 "modules": {k: m.state_dict() for k, m in modules.items() if m is not None},
                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "generators": {k: g.get_state() for k, g in generators.items()},
                 "queue": [t.clone() for t in queue]}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        torch.save(state, tmp)
        os.replace(tmp, self.path)

    def restore(self, modules: Mapping[str, nn.Module | None], optimizer: torch.optim.Optimizer,
                scheduler: Any, generators: Mapping[str, torch.Generator],
                queue: list[torch.Tensor]) -> tuple[int, float]:
        """Load the saved state into the given objects; returns (epochs done, training seconds so far)."""
        assert self.path is not None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
            raise UsageError(f"training checkpoint {self.path} is damaged or not a safe checkpoint "
                             f"({type(exc).__name__}); delete it to train from scratch") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("tag") != self.tag:
            raise UsageError(f"training checkpoint {self.path} belongs to another recipe or format; "
                             f"delete it to train from scratch")
        saved = state["modules"]
        for name, module in modules.items():
            if module is not None:
                module.load_state_dict(saved[name])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        for name, generator in generators.items():
            generator.set_state(state["generators"][name])
        queue[:] = list(state["queue"])
        return int(state["epoch"]), float(state["seconds"])

    def remove(self) -> None:
        if self.path is not None and self.path.exists():
            self.path.unlink()
