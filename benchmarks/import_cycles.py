"""Import cycles of histoscan, between its top-level units (subpackages and modules) and between its modules.

Reads the imports from the code with grimp (import-linter's graph builder), imports inside functions
included, and finds the strongly connected components (networkx, which torch already brings). Run it on
any source tree to compare before and after a change:

    python benchmarks/import_cycles.py --src src --json cycles.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grimp
import networkx as nx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Recorder, add_json_option

ROOT = Path(__file__).resolve().parents[1]


def unit_of(module: str, package: str) -> str:
    """The top-level unit of a module: ``histoscan.data.store`` -> ``data``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def measure(src: Path, package: str = "histoscan", type_checking: bool = True) -> dict[str, object]:
    """Units, unit-level cycles (with the module imports inside them), module-level cycles, lines of ``src``."""
    sys.path.insert(0, str(src.resolve()))
    graph = grimp.build_graph(package, cache_dir=None, exclude_type_checking_imports=not type_checking)
    modules = nx.DiGraph()
    units = nx.DiGraph()
    imports: list[tuple[str, str]] = []
    for module in graph.modules:
        units.add_node(unit_of(module, package))
        for imported in graph.find_modules_directly_imported_by(module):
            modules.add_edge(module, imported)
            a, b = unit_of(module, package), unit_of(imported, package)
            if a != b:
                units.add_edge(a, b)
                imports.append((module, imported))
    unit_cycles = []
    for scc in nx.strongly_connected_components(units):
        if len(scc) > 1:
            inside = sorted((m, i) for m, i in imports if unit_of(m, package) in scc and unit_of(i, package) in scc)
            pairs = {(unit_of(m, package), unit_of(i, package)) for m, i in inside}
            unit_cycles.append(
                {"units": sorted(scc), "unit_edges": len(pairs), "imports": [f"{m} -> {i}" for m, i in inside]}
            )
    module_cycles = [sorted(scc) for scc in nx.strongly_connected_components(modules) if len(scc) > 1]
    lines = sum(len(p.read_text().splitlines()) for p in (src / package).rglob("*.py"))
    return {
        "src": str(src),
        "units": units.number_of_nodes(),
        "unit_cycles": unit_cycles,
        "module_cycles": module_cycles,
        "src_lines": lines,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=ROOT / "src", help="the folder holding the package")
    ap.add_argument("--no-type-checking", action="store_true", help="leave out imports under TYPE_CHECKING")
    add_json_option(ap)
    args = ap.parse_args()
    rec = Recorder("import_cycles", "Import cycles between the units and modules of the package", args.json)
    result = measure(args.src, type_checking=not args.no_type_checking)
    print(f"{result['src']}: {result['units']} units, {result['src_lines']} lines of Python")
    cycles = result["unit_cycles"]
    assert isinstance(cycles, list)
    print(f"unit-level cycles: {len(cycles)}")
    for c in cycles:
        print(f"  {len(c['units'])} units {c['units']}: {c['unit_edges']} unit edges, {len(c['imports'])} imports")
    module_cycles = result["module_cycles"]
    assert isinstance(module_cycles, list)
    print(f"module-level cycles: {len(module_cycles)}")
    for scc in module_cycles:
        print(f"  {scc}")
    rec.figures.update(result)
    rec.write()


if __name__ == "__main__":
    main()
