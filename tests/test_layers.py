"""The module map as a contract: installed names, layers that depend one way, and no import cycles.

The folders passes/ and runtime/ install as ``arqc.passes`` and ``arqc.runtime`` (setup.cfg ``package_dir``),
which import-linter's graph builder cannot follow (it only walks the folder of ``arqc``), so the import graph
is read here from the source with ``ast``: every ``import`` statement counts, also one inside a function.
"""

from __future__ import annotations

import ast
import configparser
import importlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"arqc": ROOT / "arqc", "arqc.passes": ROOT / "passes", "arqc.runtime": ROOT / "runtime"}

# Top to bottom: a module imports only from groups below its own. Modules of one group are siblings that do not
# import each other; inside a package (commands, passes, runtime) modules import each other freely, without
# cycles. Every module of arqc must be in a group.
LAYERS = [
    ["cli"],  # the command group
    ["commands"],  # one module per command, and their shared options
    ["api"],  # the public Python API
    ["compiler"],  # compile at a fixed precision or by search
    ["arq", "certify_l2", "certify_linf", "train", "qaibp", "reports"],  # the driver's stages
    ["qat", "rewards", "onnx_import"],
    ["pipeline"],  # load → capture → analyze → simulate → lower
    ["loading", "settings", "augment", "data"],
    ["archs"],
    ["runtime"],  # certification oracles and executors; may import passes (the op registry's interval rules)
    ["passes"],  # graph passes, the op registry and the search; never runtime
    ["base"],  # the leaf: imports nothing of arqc
]
PACKAGE_INIT_MAY_IMPORT = {"arqc.base", "arqc.api"}  # arqc/__init__.py: the version and the lazy public API


def modules() -> dict[str, Path]:
    """Every module of arqc, by its installed name."""
    found = {}
    for prefix, folder in FOLDERS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([prefix, *parts])] = path
    return found


def import_graph(found: dict[str, Path]) -> dict[str, set[str]]:
    """module → the arqc modules it imports (``from P import name`` counts as P.name when that is a module)."""
    graph: dict[str, set[str]] = {}
    for name, path in found.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in node.names:
                    targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in found else base)
        graph[name] = {t for t in targets if t in found and t != name}
    return graph


def layer(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


GROUP = {name: index for index, group in enumerate(LAYERS) for name in group}


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for importer, imported in sorted(graph.items()):
        if importer == "arqc":
            problems += [f"arqc/__init__.py imports {t}" for t in sorted(imported - PACKAGE_INIT_MAY_IMPORT)]
            continue
        if layer(importer) not in GROUP:
            problems.append(f"{importer} is in no layer: add it to LAYERS in tests/test_layers.py")
            continue
        for target in sorted(imported):
            if target == "arqc":
                problems.append(f"{importer} imports the package arqc itself; import the module it needs")
            elif layer(target) != layer(importer) and GROUP.get(layer(target), -1) <= GROUP[layer(importer)]:
                problems.append(f"{importer} imports {target}, which is not in a layer below it")
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (each holds an import cycle)."""
    names = sorted(graph)
    index = {n: i for i, n in enumerate(names)}
    rows = [index[a] for a in names for b in graph[a]]
    cols = [index[b] for a in names for b in graph[a]]
    matrix = csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(names), len(names)))
    count, labels = connected_components(matrix, directed=True, connection="strong")
    groups = [[names[i] for i in np.flatnonzero(labels == k)] for k in range(count)]
    return [g for g in groups if len(g) > 1]


GRAPH = import_graph(modules())


def test_every_layer_imports_only_layers_below_it():
    problems = layer_violations(GRAPH)
    assert not problems, "\n".join(problems)


def test_no_import_cycles():
    found = cycles(GRAPH)
    assert not found, "\n".join("import cycle among " + ", ".join(group) for group in found)


def test_the_leaf_imports_nothing_of_arqc():
    assert GRAPH["arqc.base"] == set()


def test_the_checks_catch_what_they_are_for():
    """The contract is not vacuous: an upward import, a module in no layer and a cycle are each reported."""
    broken = {k: set(v) for k, v in GRAPH.items()}
    broken["arqc.runtime.smoothing"].add("arqc.compiler")  # runtime reaching up into the driver
    broken["arqc.passes.search.loop"].add("arqc.runtime.run")  # the search asking runtime itself
    broken["arqc.newthing"] = set()
    problems = layer_violations(broken)
    assert "arqc.runtime.smoothing imports arqc.compiler, which is not in a layer below it" in problems
    assert "arqc.passes.search.loop imports arqc.runtime.run, which is not in a layer below it" in problems
    assert any(p.startswith("arqc.newthing is in no layer") for p in problems)
    broken["arqc.data"].add("arqc.pipeline")  # pipeline imports data: a cycle
    assert any({"arqc.data", "arqc.pipeline"} <= set(c) for c in cycles(broken))


def test_no_module_is_installed_as_passes_or_runtime():
    """Importing every module of arqc loads nothing named passes or runtime (only arqc.passes, arqc.runtime),
    and outside the repository those bare names do not import at all."""
    for name in modules():
        importlib.import_module(name)
    assert sorted(m for m in sys.modules if m.split(".")[0] in ("passes", "runtime")) == []
    for bare in ("passes", "runtime"):
        probe = subprocess.run([sys.executable, "-c", f"import {bare}"], cwd="/", capture_output=True, text=True)
        assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr, probe.stderr


def test_setup_cfg_lists_every_package():
    """setup.cfg names the packages one by one (package_dir maps the folders); a new subpackage must be added
    there, or `pip install .` would leave it out."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    listed = set(config["options"]["packages"].split())
    packages = {name for name, path in modules().items() if path.name == "__init__.py"}
    assert listed == packages


@pytest.mark.parametrize("name", ["analyze", "compile", "certify", "report"])
def test_the_public_api_is_reachable_from_the_package(name):
    import arqc
    from arqc import api

    assert getattr(arqc, name) is getattr(api, name)
