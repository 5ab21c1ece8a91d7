"""``harness analyse ...``: analyses beyond accuracy, stored in the results DB."""

from __future__ import annotations

import click

from harness.cli.options import data_option, db_option, option_values, parse_options

__all__ = ["analyse"]


@click.group()
def analyse() -> None:
    """Analyses beyond accuracy; their results appear in `harness report`."""


@analyse.command(name="fixed-randomness")
@click.option("--defense", required=True, help="A (stochastic) purifier entry.")
@click.option("--dataset", default="cifar10", show_default=True)
@click.option("--classifier", default="trained:small", show_default=True)
@click.option("--preset", default=None)
@option_values
@click.option("--n", default=32, show_default=True, help="Test images (the same subset a cell uses).")
@click.option("--seed", default=0, show_default=True)
@click.option("--eps", default="8/255", show_default=True)
@click.option("--steps", default=20, show_default=True, help="PGD steps of the fixed-randomness attack.")
@db_option
@data_option
def analyse_fixed_randomness(defense, dataset, classifier, preset, options, n, seed, eps, steps, db,
                             data_root) -> None:
    """Distances to the clean image, spread across seeds vs inputs, and compression rates (Liu & Wei,
    arXiv 2505.22839), with the purifier's noise fixed per sample; stored in the results DB (prints
    the record's key)."""
    from harness.analysis.study import StudyRequest, run_study
    from harness.results.database import open_db

    request = StudyRequest(defense=defense, dataset=dataset, classifier=classifier, preset=preset,
                           options=parse_options(options), n=n, seed=seed, eps=eps,
                           attack={"name": "pgd", "steps": steps}, data_root=data_root)
    click.echo(run_study(request, open_db(db)))


@analyse.command(name="representations")
@click.option("--defense", "defenses", required=True, multiple=True,
              help="Entries of kind classifier (or `none`, the base classifier), comma-separated.")
@click.option("--dataset", default="cifar10", show_default=True)
@click.option("--classifier", default="trained:small", show_default=True,
              help="The base classifier of `none`.")
@click.option("--preset", default=None, help="The entries' preset (default: each entry's own).")
@option_values
@click.option("--train-seed", default=0, show_default=True, help="Training seed of the entries' networks.")
@click.option("--n", default=512, show_default=True, help="Test images (the same subset a cell uses).")
@click.option("--train-n", default=10000, show_default=True, help="Training images the SAE is trained on.")
@click.option("--latents", default=1024, show_default=True, help="SAE dictionary size (the same for all).")
@click.option("--k", default=32, show_default=True, help="SAE: active latents per input (the same for all).")
@click.option("--sae-steps", default=2000, show_default=True, help="SAE: Adam steps.")
@click.option("--sae-lr", default=1e-3, show_default=True, help="SAE: Adam learning rate.")
@click.option("--seed", default=0, show_default=True, help="SAE initialisation and batch order.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@db_option
@data_option
def analyse_representations(defenses, dataset, classifier, preset, options, train_seed, n, train_n, latents, k,
                            sae_steps, sae_lr, seed, no_progress, db, data_root) -> None:
    """Effective rank (Roy & Vetterli 2007) and top-k SAE reconstruction loss (Gao et al. 2024) of each
    entry's penultimate features (the DRA paper's analyses); one row per entry in the results DB
    (prints their keys)."""
    from harness.analysis.representations import (RepresentationsRequest, SAESettings, check_request,
                                                  run_representations)
    from harness.cli.options import split_csv
    from harness.results.database import open_db

    request = RepresentationsRequest(
        defenses=split_csv(defenses), dataset=dataset, classifier=classifier, preset=preset,
        options=parse_options(options), n=n, train_n=train_n, train_seed=train_seed,
        sae=SAESettings(latents=latents, k=k, steps=sae_steps, lr=sae_lr, seed=seed), data_root=data_root,
        progress=not no_progress)
    check_request(request)  # bad input creates no store
    for key in run_representations(request, open_db(db)):
        click.echo(key)


@analyse.command(name="diffusion-probe")
@click.option("--dataset", default="cifar10", show_default=True)
@click.option("--classifier", default="trained:small", show_default=True,
              help="The standard classifier whose penultimate features the comparison probe reads.")
@click.option("--ddpm-preset", default="small", show_default=True, help="The shared DDPM's preset.")
@click.option("--timestep", default=100, show_default=True, help="Diffusion timestep t of the features.")
@click.option("--block", default="mid", show_default=True, help="UNet block: mid, down.K or up.K.")
@click.option("--pool", default="avg", show_default=True, help="Spatial pooling: avg or max.")
@click.option("--noise-seed", default=0, show_default=True, help="Seed of the per-image pinned noise.")
@click.option("--representation", "representations", multiple=True, default=("diffusion,classifier",),
              show_default=True, help="Which probes: diffusion, classifier.")
@click.option("--n", default=512, show_default=True, help="Test images (the same subset a cell uses).")
@click.option("--train-n", default=10000, show_default=True,
              help="Training images of the probe (their diffusion features are cached).")
@click.option("--probe-steps", default=300, show_default=True, help="Full-batch Adam steps of the probe.")
@click.option("--probe-lr", default=0.05, show_default=True)
@click.option("--weight-decay", default=1e-4, show_default=True, help="L2 penalty on the probe's weights.")
@click.option("--threat", default="linf", show_default=True)
@click.option("--eps", default="8/255", show_default=True)
@click.option("--attack", "attacks", multiple=True, default=("pgd:steps=20",), show_default=True,
              help="Attack spec(s), as for `harness run` (exact gradients, noise pinned per image).")
@click.option("--seed", default=0, show_default=True, help="Attack seed and probe initialisation.")
@click.option("--batch-size", default=64, show_default=True, help="Images per attack batch.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@db_option
@data_option
def analyse_diffusion_probe(dataset, classifier, ddpm_preset, timestep, block, pool, noise_seed, representations,
                            n, train_n, probe_steps, probe_lr, weight_decay, threat, eps, attacks, seed,
                            batch_size, no_progress, db, data_root) -> None:
    """"Diffusion features are partially robust" (the DRA paper): linear probes on frozen DDPM features
    and on a standard classifier's penultimate features, clean and attacked end to end; one row per
    representation and attack in the results DB (prints their keys)."""
    from harness.analysis.diffusion_probe import ProbeRequest, check_probe_request, run_diffusion_probe
    from harness.attacks.catalog import parse_attack_spec
    from harness.cli.options import split_csv
    from harness.results.database import open_db

    request = ProbeRequest(
        dataset=dataset, classifier=classifier, ddpm_preset=ddpm_preset, timestep=timestep, block=block,
        pool=pool, noise_seed=noise_seed, representations=split_csv(representations), n=n, train_n=train_n,
        probe_steps=probe_steps, probe_lr=probe_lr, weight_decay=weight_decay, threat=threat, eps=eps,
        attacks=tuple(parse_attack_spec(a) for a in attacks), seed=seed, batch_size=batch_size,
        data_root=data_root, progress=not no_progress)
    check_probe_request(request)  # bad input creates no store
    for key in run_diffusion_probe(request, open_db(db)):
        click.echo(key)
