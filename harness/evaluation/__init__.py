"""The evaluation engine: ``building`` (an entry -> a ready defended model), ``protocols`` (how an attack
meets a defense), ``metrics`` (image quality of purified images) and ``runner`` (plan a grid of cells,
skip stored ones, execute the rest batch by batch into the results store).

It knows no defense by name and never imports :mod:`defenses`: entries come from the registry.
"""
