"""Attacks: each maps (model, images, labels) to adversarial images inside the threat model.

Build one by name with :func:`harness.attacks.factory.build_attack`.
"""
