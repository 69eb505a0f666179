"""The package's import graph goes only down: no module imports one of a higher layer, and no
two modules import each other through any chain (README's "Layout" states the layers).

The graph is read from the source with ``ast`` (every ``import`` and ``from ... import``,
at module level or inside a function, relative ones resolved), so a test of it costs no import.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "fused_ce"

# Lowest first. A module belongs to the layer of the longest prefix that names it; it may
# import its own layer's modules (without cycles) and lower layers', never a higher one's.
LAYERS: tuple[tuple[str, ...], ...] = (
    # Pure @triton.jit kernels (no torch).
    ("kernels",),
    # Helpers that import nothing of the package: the shared shapes and layouts, argument
    # checks, autocast, the docstring templates, the C++ build recipe.
    ("_common", "_validation", "_autocast", "_docs", "_memory", "native._build"),
    # The native library's loader and the backend choice (which asks the loader).
    ("native", "_backend"),
    # The three implementations of every kernel family, and the CUDA launcher of Triton's.
    ("launch", "native.cross_entropy", "native.bce", "native.distill", "torch_impl", "cuda_launch"),
    # What the ops and the public functions share above the implementations: output buffers,
    # the backend -> implementation table, reductions and the z-loss/stats, chunked drivers.
    ("_outputs", "_impl", "_reduction", "_chunked", "_chunked_distill"),
    # The custom ops (fakes, autograd) and their eager fast paths.
    ("ops",),
    # The public functions.
    ("functional", "linear", "distill", "scoring", "distributed"),
    # The modules over them.
    ("nn", "_distill_modules"),
    # The package's namespace, integrations and the app.
    ("", "integrations", "app"),
)


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted name below ``fused_ce`` ("" for the package itself) -> (file, is a package)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        found[".".join(parts)] = (path, is_package)
    return found


MODULES = _modules()


def _known(name: str) -> str:
    """The nearest module of the package that ``name`` (dotted, below fused_ce) is in."""
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _package_path(module: str) -> list[str]:
    """The package ``module`` is in (itself for a package), as the parts below fused_ce."""
    here = module.split(".") if module else []
    return here if MODULES[module][1] else here[:-1]


def _source(node: ast.ImportFrom, here: list[str]) -> str | None:
    """The dotted name, below fused_ce, of what ``from ... import`` imports from (None when
    outside the package)."""
    if node.level:
        base = here[: len(here) - node.level + 1]
        return ".".join([*base, *([node.module] if node.module else [])])
    name = node.module or ""
    if name == "fused_ce" or name.startswith("fused_ce."):
        return name.removeprefix("fused_ce").removeprefix(".")
    return None


def _imports(module: str) -> dict[str, int]:
    """The package's modules that ``module`` imports, each with the line of its first import."""
    path = MODULES[module][0]
    here = _package_path(module)
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [
                alias.name.removeprefix("fused_ce").removeprefix(".")
                for alias in node.names
                if alias.name == "fused_ce" or alias.name.startswith("fused_ce.")
            ]
        elif isinstance(node, ast.ImportFrom):
            origin = _source(node, here)
            if origin is None:
                continue
            # `from pkg import name`: the submodule pkg.name when there is one, else pkg.
            names = [
                f"{origin}.{alias.name}".lstrip(".")
                if f"{origin}.{alias.name}".lstrip(".") in MODULES
                else origin
                for alias in node.names
            ]
        else:
            continue
        for name in names:
            target = _known(name)
            if target != module:
                found.setdefault(target, node.lineno)
    return found


def _layer(module: str) -> int:
    best, best_length = None, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            named = (
                prefix == ""
                and module == ""
                or (prefix and (module == prefix or module.startswith(prefix + ".")))
            )
            if named and len(prefix) > best_length:
                best, best_length = index, len(prefix)
    assert best is not None, f"fused_ce.{module}: in no layer of LAYERS"
    return best


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return components


GRAPH = {module: _imports(module) for module in MODULES}


def _name(module: str) -> str:
    return f"fused_ce.{module}" if module else "fused_ce"


def test_the_graph_is_read():
    # The checker sees relative, absolute, function-level and `from . import x` imports.
    assert "_common" in GRAPH["torch_impl.cross_entropy"]
    assert "ops.cross_entropy" in GRAPH["functional"]
    assert "native" in GRAPH["_backend"]  # `from . import native`
    assert "functional" in GRAPH[""]
    assert "kernels.cross_entropy" in GRAPH["kernels.linear_cross_entropy"]


def test_every_module_has_a_layer():
    for module in MODULES:
        _layer(module)


def test_no_import_climbs_a_layer():
    upward = [
        f"{_name(module)} (layer {_layer(module)}) imports {_name(target)} "
        f"(layer {_layer(target)}) at line {line}"
        for module, targets in GRAPH.items()
        for target, line in targets.items()
        if _layer(target) > _layer(module)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    assert not _cycles(GRAPH), [[_name(m) for m in cycle] for cycle in _cycles(GRAPH)]


def test_no_cycle_between_folders():
    # native/ and _outputs.py once imported each other through different modules of native/.
    folders: dict[str, dict[str, int]] = {}
    for module, targets in GRAPH.items():
        edges = folders.setdefault(module.split(".")[0], {})
        for target in targets:
            if target.split(".")[0] != module.split(".")[0] and target:
                edges.setdefault(target.split(".")[0], 0)
    for targets in list(folders.values()):
        for target in targets:
            folders.setdefault(target, {})
    assert not _cycles(folders), _cycles(folders)


PUBLIC = LAYERS[6]


def test_no_private_name_from_a_public_module():
    # A rule shared by public modules lives below them (the reductions in _reduction.py, the
    # linear heads' options in _validation.py), not in one of them.
    borrowed = []
    for module, (path, _) in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.ImportFrom) or _source(node, _package_path(module)) is None:
                continue
            origin = _known(_source(node, _package_path(module)))
            if origin.split(".")[0] in PUBLIC and origin.split(".")[0] != module.split(".")[0]:
                borrowed += [
                    f"{_name(module)}:{node.lineno} imports {alias.name} from {_name(origin)}"
                    for alias in node.names
                    if alias.name.startswith("_")
                ]
    assert not borrowed, "\n".join(borrowed)
