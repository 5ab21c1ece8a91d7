"""The shared base of diffusion purifiers, and how entries obtain their UNet.

A :class:`DiffusionPurifier` wraps a frozen noise-prediction UNet and its schedule. Subclasses
implement ``purify(x, noise)`` on images in [-1, 1]; all randomness comes from the
:class:`~harness.core.noise.NoiseDraws` of the call, and with ``batch_invariant`` (default) the UNet sees one
image at a time, so an image's output never depends on the batch it is in (batched convolutions on
CPU differ from single-image ones in the last bits).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from harness.core.artifacts import ArtifactCache
from harness.core.context import BuildContext, TrainContext
from harness.toolkit.diffusion.model import LoadedUNet, load_unet, unet_from_state
from harness.toolkit.diffusion.sampler import SAMPLERS, GradientGuide, Guide, Schedule
from harness.toolkit.diffusion.train import DDPM_RECIPE_VERSION, shared_ddpm
from harness.core.errors import UsageError
from harness.core.noise import NoiseDraws
from harness.core.entry import Defense, Option, Purifier

__all__ = ["SAMPLER_OPTIONS", "GUIDANCE", "DiffusionPurifier", "ReversePurifier", "entry_build", "diffusion_options",
           "load_entry_unet", "train_entry_ddpm"]

SAMPLER_OPTIONS = ("unet", "sampler", "eta", "checkpoint", "batch_invariant")
GUIDANCE = ("x0", "unet")  # how a guided purifier pulls toward its input (harness.toolkit.diffusion.sampler)


#: every option a diffusion entry may declare: (type, help, choices)
_OPTIONS: dict[str, tuple[type, str, tuple[Any, ...]]] = {
    "tstar": (float, "diffusion time t* in (0, 1]: how far the input is noised before denoising", ()),
    "steps": (int, "reverse-process steps (ADP: the most score-ascent steps)", ()),
    "iters": (int, "ScoreOpt: optimisation iterations", ()),
    "lr": (float, "ScoreOpt: Adam learning rate", ()),
    "scale": (float, "guidance scale toward the input", ()),
    "D": (int, "DDA: down-sampling factor of the low-pass filter", ()),
    "delta": (float, "MimicDiffusion: smoothing of |u| to sqrt(u^2 + delta^2)", ()),
    "guidance": (str, "guidance gradient: x0 (x0-space step) or unet (through the UNet, the papers' way)",
                 GUIDANCE),
    "sigma": (float, "ADP: std of the injected Gaussian noise (pixel units)", ()),
    "step_scale": (float, "ADP: lambda, the scale of the line-searched step", ()),
    "score_sigma": (float, "ADP: noise level of the score model (pixel units)", ()),
    "stop": (float, "ADP: an image stops once its step size falls to this", ()),
    "unet": (str, "a pretrained UNet instead of the trained DDPM: hf:<repo id>[:<subfolder>] or a "
                  "save_pretrained folder", ()),
    "sampler": (str, "reverse sampler", tuple(SAMPLERS)),
    "eta": (float, "DDIM eta (0: deterministic, 1: DDPM); default: the sampler's", ()),
    "checkpoint": (bool, "gradient checkpointing through the unrolled purifier (memory for compute)", ()),
    "batch_invariant": (bool, "run the UNet one image at a time, so no output depends on its batch", ()),
}


def diffusion_options(settings: tuple[str, ...], shared: tuple[str, ...] = SAMPLER_OPTIONS) -> tuple[Option, ...]:
    """The declared :class:`~harness.core.entry.Option` s of a diffusion entry with ``settings`` of its
    own plus ``shared`` sampler options; defaults are the preset's values."""
    return tuple(Option(name, _OPTIONS[name][0], _OPTIONS[name][1], choices=_OPTIONS[name][2])
                 for name in settings + shared)


def _with_preset(config: Mapping[str, Any], options: Mapping[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """The preset's values of ``names`` overridden by the (already validated) ``--option`` values."""
    return {**{k: config[k] for k in names if k in config}, **options}


def train_entry_ddpm(ctx: TrainContext) -> dict[str, torch.Tensor]:
    """An entry's ``train`` recipe: the dataset's shared DDPM (trained once, reused by every entry)."""
    preset = ctx.config["ddpm"]
    return shared_ddpm(ctx.artifacts or ArtifactCache(), preset, ctx.train_split, ctx.seed,
                       progress=ctx.progress).load()


def load_entry_unet(ctx: BuildContext, opts: Mapping[str, Any]) -> LoadedUNet:
    """The UNet named by option ``unet`` (``hf:<repo>`` or a folder), else the entry's trained DDPM."""
    source = opts.get("unet") or ""
    if source:
        return load_unet(str(source))
    preset = ctx.config["ddpm"]
    return unet_from_state(preset, ctx.weights(), ctx.dataset.image_shape,
                           {"source": f"trained:{preset}", "kind": "harness",
                            "recipe_version": DDPM_RECIPE_VERSION})


class DiffusionPurifier(Purifier):
    """Base of diffusion purifiers: UNet evaluation, schedule and sampler options.

    ``provenance`` (the UNet's source and the sampler settings) is meant to be stored with each cell.
    """

    def __init__(self, loaded: LoadedUNet, *, sampler: str = "ddpm", eta: float | None = None,
                 use_checkpoint: bool = True, batch_invariant: bool = True, **settings: Any):
        super().__init__()
        if sampler not in SAMPLERS:
            raise UsageError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
        self.unet = loaded.unet
        self.schedule = Schedule(loaded.scheduler.alphas_cumprod.float().clone())
        self.eta = float(SAMPLERS[sampler] if eta is None else eta)
        self.use_checkpoint = bool(use_checkpoint)
        self.batch_invariant = bool(batch_invariant)
        self.provenance = {"unet": loaded.provenance, "sampler": sampler, "eta": self.eta,
                           "checkpoint": self.use_checkpoint, "batch_invariant": self.batch_invariant,
                           **settings}

    @classmethod
    def from_options(cls, loaded: LoadedUNet, opts: Mapping[str, Any], **settings: Any) -> "DiffusionPurifier":
        """Build with the shared :data:`SAMPLER_OPTIONS` taken from ``opts`` plus ``settings``."""
        return cls(loaded, sampler=str(opts.get("sampler", "ddpm")), eta=opts.get("eta"),
                   use_checkpoint=bool(opts.get("checkpoint", True)),
                   batch_invariant=bool(opts.get("batch_invariant", True)), **settings)

    def eps(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """Predicted noise at timestep ``t`` for ``x`` (diffusion scale, [-1, 1] data)."""
        if not self.batch_invariant:
            return self.unet(x, t).sample
        return torch.cat([self.unet(x[i:i + 1], t).sample for i in range(len(x))])

    def purify(self, x: torch.Tensor, noise: NoiseDraws) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(self, x: torch.Tensor, noise: NoiseDraws) -> torch.Tensor:
        out = self.purify(x * 2 - 1, noise)
        return ((out + 1) / 2).clamp(0, 1)


class ReversePurifier(DiffusionPurifier):
    """Start at t* (the input diffused there, or pure noise with ``from_noise``) and run ``steps``
    reverse steps to 0, optionally guided toward the input by :meth:`guide`.

    Draw 0 is the starting noise, draw k (k >= 1) the noise of reverse step k. Guided subclasses
    (``guided = True``) define a per-image loss :meth:`guide_loss` and its x0-gradient :meth:`guide`;
    ``guidance`` (one of :data:`GUIDANCE`) picks whether the pull is taken on x0 or through the UNet.
    """

    guided = False  # subclasses that override guide() and guide_loss() set this

    def __init__(self, loaded: LoadedUNet, *, tstar: float, steps: int, from_noise: bool = False,
                 guidance: str = "x0", **kwargs: Any):
        if guidance not in GUIDANCE:
            raise UsageError(f"unknown guidance {guidance!r}; valid: {', '.join(GUIDANCE)}")
        if self.guided:
            kwargs["guidance"] = guidance
        super().__init__(loaded, tstar=float(tstar), steps=int(steps), **kwargs)
        self.from_noise = from_noise
        self.guidance = guidance
        self.start = self.schedule.start_index(float(tstar))
        self.timesteps = self.schedule.timesteps(self.start, int(steps))

    def guide_loss(self, x0: torch.Tensor, t: int, ref: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """The per-image guidance loss ``L(x0, ref)`` (shape ``(batch,)``) pulling the predicted clean
        image ``x0`` toward the input ``ref``; its x0-gradient is :meth:`guide`."""
        raise NotImplementedError

    def guide(self, x0: torch.Tensor, t: int, ref: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """``grad_{x0} guide_loss``, in closed form: the step subtracted from ``x0`` (predicted clean
        image at step ``t``) with ``guidance=x0`` (see :mod:`harness.toolkit.diffusion.sampler`)."""
        raise NotImplementedError

    def _guide(self, x: torch.Tensor) -> Guide | GradientGuide | None:
        if not self.guided:
            return None
        if self.guidance == "unet":
            return GradientGuide(lambda x0, t: self.guide_loss(x0, t, x),
                                 create_graph=torch.is_grad_enabled() and x.requires_grad)
        return lambda x0, t: self.guide(x0, t, x)

    def purify(self, x: torch.Tensor, noise: NoiseDraws) -> torch.Tensor:
        shape = x.shape[1:]
        eps = noise.randn(shape, device=x.device, dtype=x.dtype)
        noises = [noise.randn(shape, device=x.device, dtype=x.dtype) for _ in self.timesteps]
        xt = eps if self.from_noise else self.schedule.diffuse(x, self.start, eps)
        return self.schedule.reverse(self.eps, xt, self.timesteps, noises, self.eta, guide=self._guide(x),
                                     use_checkpoint=self.use_checkpoint)


def entry_build(cls: type[DiffusionPurifier], settings: tuple[str, ...],
                shared: tuple[str, ...] = SAMPLER_OPTIONS) -> Callable[[BuildContext], Defense]:
    """A ``DefenseEntry.build`` for purifier ``cls``: options ``settings`` + ``shared`` (a subset of
    :data:`SAMPLER_OPTIONS`), defaults from the preset, the UNet from :func:`load_entry_unet`."""
    def build(ctx: BuildContext) -> Defense:
        opts = _with_preset(ctx.config, ctx.options, settings + shared)
        purifier = cls.from_options(load_entry_unet(ctx, opts), opts, **{k: opts[k] for k in settings})
        return Defense(ctx.classifier, purifier)

    build.__doc__ = f"Build a {cls.__name__} defense (options: {', '.join(settings + shared)})."
    return build
