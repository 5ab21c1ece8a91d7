"""Classifiers: ``architectures`` (the networks harness can build), ``training`` (harness's recipe
for them) and ``sources`` (a classifier from a spec: ``trained:<preset>``, a file, ``robustbench:<name>``).

Sits on :mod:`harness.core`, :mod:`harness.data` and :mod:`harness.attacks` (adversarial training).
"""
