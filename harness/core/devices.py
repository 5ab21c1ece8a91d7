"""Devices: ``--device cpu|cuda|cuda:N|auto`` parsed into a :class:`torch.device`, checked before anything
runs, and described for a run's provenance."""

from __future__ import annotations

import re

import torch

from harness.core.errors import UsageError

__all__ = ["DEVICE_CHOICES", "resolve_device", "describe_device"]

DEVICE_CHOICES = "cpu, cuda, cuda:N, auto"


def resolve_device(spec: str) -> torch.device:
    """The device ``spec`` names: ``cpu``, ``cuda`` (the current GPU), ``cuda:N`` or ``auto`` (CUDA when it
    is available, else the CPU). A CUDA device that is not here is a one-line :class:`UsageError`."""
    text = str(spec).strip().lower()
    if text == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if match is None:
        raise UsageError(f"--device {spec!r} is not a device; valid: {DEVICE_CHOICES}")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {spec}: CUDA is not available here (torch {torch.__version__}, "
                         f"{torch.cuda.device_count()} GPUs); valid here: cpu, auto")
    if match.group(1) is not None and int(match.group(1)) >= torch.cuda.device_count():
        raise UsageError(f"--device {spec}: this machine has {torch.cuda.device_count()} GPU(s); "
                         f"valid: cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return torch.device(text)


def describe_device(device: torch.device) -> str:
    """What a run computed on, for its provenance: ``cpu (N threads)`` or ``cuda:N (GPU name)``."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return f"{device.type} ({torch.get_num_threads()} threads)"
