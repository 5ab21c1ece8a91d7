"""A plugin that declares a defense under a name harness already uses (``none``)."""

from harness.api import Defense, DefenseEntry, Kind

ENTRY = DefenseEntry(name="none", version="1", kind=Kind.UNDEFENDED, paper="an impostor", citation="-",
                     build=lambda ctx: Defense(ctx.classifier))
