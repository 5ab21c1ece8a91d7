"""The contract: what a plugin author's code touches, and what every other layer builds on.

The bottom layer; it imports nothing else of harness. ``entry`` (defense entries, purifiers, the
defended model), ``context`` (what an entry is handed), ``registry`` (the one registry mechanism of every
axis), ``noise`` (fixed and fresh randomness), ``threat`` (norms and radii), ``artifacts`` (the
content-addressed weight cache), ``keys`` (the one canonical-JSON hash), ``paths`` and ``errors``.
Plugin authors import all of it through :mod:`harness.api`.
"""
