"""Randomness as an argument, not a global.

Every stochastic purifier draws its noise from a :class:`NoiseDraws` object that the caller hands it
for one forward pass. Two sources make those objects:

* :class:`FixedNoise` (the *fixed-randomness* protocol of Liu & Wei, "How Do Diffusion Models Improve
  Adversarial Robustness?", arXiv 2505.22839): the k-th draw of a forward pass for sample ``i`` is
  seeded from ``(seed, i, k)`` alone, so a sample gets bit-identical noise on every call, whatever batch
  it is in. The defended model becomes a deterministic function that can be attacked with exact
  gradients.
* :class:`FreshNoise`: new draws on every call (the setting of EOT attacks), still reproducible from a
  seed because it owns its generator; nothing touches torch's global RNG.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from typing import Sequence

import torch

__all__ = ["NoiseDraws", "NoiseSource", "FixedNoise", "FreshNoise", "noise_source"]


def _stream_seed(*parts: object) -> int:
    """A 63-bit seed derived from ``parts`` by hashing (stable across processes and platforms)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class NoiseDraws(ABC):
    """The random draws available to one forward pass of a batch."""

    @property
    def key(self) -> tuple | None:
        """What determines every draw still to come, when that is known in advance (fixed randomness, no
        draw taken yet): two draws objects with one key give the same draws. ``None`` otherwise."""
        return None

    @abstractmethod
    def randn(self, shape: Sequence[int], *, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normal noise of shape ``(batch, *shape)``."""

    @abstractmethod
    def rand(self, shape: Sequence[int], *, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Uniform [0, 1) noise of shape ``(batch, *shape)``."""


class NoiseSource(ABC):
    """Makes the :class:`NoiseDraws` for one call on the samples with dataset ``indices``."""

    kind: str

    @abstractmethod
    def draws(self, indices: torch.Tensor | Sequence[int]) -> NoiseDraws:
        """Draws for one forward pass over the samples ``indices`` (dataset positions)."""

    @abstractmethod
    def describe(self) -> dict[str, object]:
        """JSON-able description, stored with each cell."""


class _PerSampleDraws(NoiseDraws):
    """Draw ``k`` of sample ``i`` is the stream seeded by ``(seed, namespace, i, k)``, drawn on the requested
    device by one generator per device, reseeded for each sample (no generator object per sample or draw).
    On the CPU the values are those of ``torch.Generator().manual_seed(stream seed)``; a CUDA generator
    draws its own (equally per-sample) values."""

    def __init__(self, seed: int, namespace: str, indices: Sequence[int]):
        self._seed = seed
        self._namespace = namespace
        self._indices = [int(i) for i in indices]
        self._count = 0

    @property
    def key(self):
        return None if self._count else ("fixed", self._seed, self._namespace, tuple(self._indices))

    def _draw(self, fn, shape, device, dtype) -> torch.Tensor:
        k = self._count
        self._count += 1
        device = torch.device(device)
        out = torch.empty((len(self._indices), *shape), dtype=dtype, device=device)
        gen = _generator(device)
        for row, index in enumerate(self._indices):
            gen.manual_seed(_stream_seed(self._seed, self._namespace, index, k))
            fn(tuple(shape), generator=gen, dtype=dtype, device=device, out=out[row])
        return out

    def randn(self, shape, *, device="cpu", dtype=torch.float32):
        return self._draw(torch.randn, shape, device, dtype)

    def rand(self, shape, *, device="cpu", dtype=torch.float32):
        return self._draw(torch.rand, shape, device, dtype)


def _generator(device: torch.device) -> torch.Generator:
    """A generator on ``device`` (reseeded by its user before every draw)."""
    return torch.Generator(device=device)


class _GeneratorDraws(NoiseDraws):
    """Draws from one shared, advancing generator (fresh randomness); its source keeps one per device."""

    def __init__(self, source: "FreshNoise", batch: int):
        self._source = source
        self._batch = batch

    def randn(self, shape, *, device="cpu", dtype=torch.float32):
        device = torch.device(device)
        return torch.randn((self._batch, *shape), generator=self._source.generator(device), dtype=dtype,
                           device=device)

    def rand(self, shape, *, device="cpu", dtype=torch.float32):
        device = torch.device(device)
        return torch.rand((self._batch, *shape), generator=self._source.generator(device), dtype=dtype,
                          device=device)


class FixedNoise(NoiseSource):
    """Per-sample fixed randomness: the same sample always receives the same draws."""

    kind = "fixed"

    def __init__(self, seed: int, namespace: str = "defense"):
        self.seed = int(seed)
        self.namespace = namespace

    def draws(self, indices):
        if isinstance(indices, torch.Tensor):
            indices = indices.tolist()
        return _PerSampleDraws(self.seed, self.namespace, indices)

    def describe(self):
        return {"kind": self.kind, "seed": self.seed, "namespace": self.namespace}


class FreshNoise(NoiseSource):
    """Fresh randomness on every call, reproducible from ``seed`` through private generators (one per
    device, each seeded from ``seed``; on the CPU the stream is that of ``torch.Generator``)."""

    kind = "fresh"

    def __init__(self, seed: int):
        self.seed = int(seed)
        self._gens: dict[torch.device, torch.Generator] = {}

    def generator(self, device: torch.device) -> torch.Generator:
        """This source's advancing generator on ``device``."""
        if device not in self._gens:
            self._gens[device] = _generator(device).manual_seed(_stream_seed(self.seed, "fresh"))
        return self._gens[device]

    def draws(self, indices):
        return _GeneratorDraws(self, len(indices))

    def describe(self):
        return {"kind": self.kind, "seed": self.seed}


def noise_source(kind: str, seed: int, namespace: str = "defense") -> NoiseSource:
    """Build a noise source by name: ``fixed`` or ``fresh``."""
    if kind == "fixed":
        return FixedNoise(seed, namespace)
    if kind == "fresh":
        return FreshNoise(seed)
    raise ValueError(f"unknown noise kind {kind!r}; valid: fixed, fresh")
