"""The toolkit first-party entries are built from, and plugins may reuse (through :mod:`harness.api`).

``pairs`` (adversarial training pairs against a classifier), ``purifier_training`` (training a purifier
on pairs), ``transfer`` (a purifier adapted to another image shape) and ``diffusion`` (UNets, DDPM
training, the differentiable sampler, the diffusion purifier base). Never imports the evaluation engine.
"""
