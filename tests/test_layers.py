"""The import graph of harness has no cycles (the layer contracts themselves are `lint-imports`')."""

from __future__ import annotations

import subprocess
import sys

import grimp

#: the root package re-exports ``harness.evaluate`` from an import inside its ``__getattr__``: it runs on
#: first use of the attribute, never while a module is imported (checked below), so it closes no cycle
LAZY_IMPORTS = {("harness", "harness.api")}


def _graph() -> grimp.ImportGraph:
    graph = grimp.build_graph("harness", exclude_type_checking_imports=True, cache_dir=None)
    for importer, imported in LAZY_IMPORTS:
        graph.remove_import(importer=importer, imported=imported)
    return graph


def _cycles(graph: grimp.ImportGraph) -> list[tuple[str, ...]]:
    """One shortest cycle through each direct import that lies on one: ``(a, b, ..., a)``."""
    cycles = []
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            back = graph.find_shortest_chain(importer=imported, imported=importer)
            if back:
                cycles.append((importer, *back))
    return cycles


def test_no_module_reaches_itself_through_imports():
    graph = _graph()
    assert len(graph.modules) > 50  # the whole package was read
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_cycle_detection_finds_a_cycle():
    graph = _graph()
    graph.add_import(importer="harness.core.keys", imported="harness.cli.app")
    cycles = _cycles(graph)
    assert any(c[0] == "harness.core.keys" and c[-1] == "harness.core.keys" for c in cycles)


def test_the_ignored_import_is_lazy():
    code = "import sys, harness.results.provenance; print('harness.api' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
