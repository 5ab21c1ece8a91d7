"""Attacks: each maps (target, images, labels) to adversarial images inside the threat model.

``base`` (the attack contract and projections), ``pgd`` (harness's PGD), ``autoattack`` (the autoattack
library), ``library`` (its single attacks), ``transfer`` (PGD on a source model the runner resolves,
replayed) and ``catalog`` (the registry of attacks by name, and the parsing of attack specs). Sits on
:mod:`harness.core` only.
"""
