"""Imports go one way: a featkd module imports only from its own layer or the layers below (ARCHITECTURE.md)."""

import ast
from pathlib import Path

import pytest

import featkd

PACKAGE = Path(featkd.__file__).resolve().parent

# From the top down; each module belongs to the layer of the longest prefix that names it.
LAYERS = [
    ["featkd.cli"],
    ["featkd.commands"],
    ["featkd.runs", "featkd.run_data", "featkd.repro", "featkd.sweep", "featkd.fused", "featkd.strategies", "featkd.plots", "featkd.saved_runs"],
    ["featkd.distiller", "featkd.terms", "featkd.engine", "featkd.calibration", "featkd.teacher_input"],
    ["featkd.batches", "featkd.model_outputs", "featkd.hooks", "featkd.layer_specs", "featkd.layer_info", "featkd.layouts", "featkd.layer_pairs", "featkd.losses",
     "featkd.functional", "featkd.models", "featkd.data", "featkd.checkpoint", "featkd.locking", "featkd.config",
     "featkd.schema",
     "featkd.distributed", "featkd.stats", "featkd.provenance", "featkd.teachers",
     "featkd.shipped", "featkd.published"],
]
DEPTH = {prefix: depth for depth, prefixes in enumerate(LAYERS) for prefix in prefixes}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(name: str) -> int | None:
    """The layer depth of module ``name`` (None for the package itself, which only maps names lazily)."""
    matches = [prefix for prefix in DEPTH if name == prefix or name.startswith(prefix + ".")]
    return DEPTH[max(matches, key=len)] if matches else None


def is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported_modules(source: str, name: str, is_package: bool = False) -> list[tuple[int, str]]:
    """Every featkd module the ``source`` of module ``name`` imports, at module level or inside functions,
    with its line number."""
    package = name if is_package else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:  # `from featkd import checkpoint` imports a module, not a name
                candidate = f"{base}.{alias.name}"
                found.append((node.lineno, candidate if is_module(candidate) else base))
    return [(line, module) for line, module in found if module == "featkd" or module.startswith("featkd.")]


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    unplaced = [module_name(p) for p in SOURCES if module_name(p) != "featkd" and layer(module_name(p)) is None]
    assert not unplaced, f"add these modules to a layer in LAYERS and ARCHITECTURE.md: {unplaced}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_imports_point_down(path):
    importer = module_name(path)
    if importer == "featkd":
        return
    imports = imported_modules(path.read_text(), importer, path.name == "__init__.py")
    upward = [f"line {line}: {module}" for line, module in imports
              if module != "featkd" and layer(module) < layer(importer)]
    assert not upward, f"{importer} (layer {LAYERS[layer(importer)]}) imports from a higher layer: {upward}"


def test_the_check_sees_relative_and_function_level_imports():
    source = """
from . import functional as KF
from .hooks import FeatureExtractor
from featkd import checkpoint as ckpt
import featkd.models


def build():
    from featkd.commands.train import run
"""
    found = [module for _, module in imported_modules(source, "featkd.distiller")]
    assert found == ["featkd.functional", "featkd.hooks", "featkd.checkpoint", "featkd.models", "featkd.commands.train"]
    assert [m for m in found if layer(m) < layer("featkd.distiller")] == ["featkd.commands.train"]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_private_modules_are_imported_only_within_their_package(path):
    # a helper other packages need is public (featkd.functional.shapes), so that its interface is kept
    importer = module_name(path)
    package = importer if path.name == "__init__.py" else importer.rpartition(".")[0]
    foreign = [f"line {line}: {module}" for line, module in imported_modules(path.read_text(), importer,
                                                                              path.name == "__init__.py")
               if module.rpartition(".")[2].startswith("_") and module.rpartition(".")[0] != package]
    assert not foreign, f"{importer} imports another package's private module: {foreign}"


def test_the_lazy_public_names_are_imported_for_type_checkers_too():
    import ast

    import featkd as package

    tree = ast.parse(Path(package.__file__).read_text())
    guarded = next(node for node in tree.body if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING")
    imported = {}
    for node in guarded.body:
        for alias in node.names:
            imported[alias.asname or alias.name] = (node.module if node.module != "featkd" else f"featkd.{alias.name}")
    assert imported == package._PUBLIC
    for name in package.__all__:
        assert getattr(package, name) is not None


def test_no_function_is_over_80_lines():
    long = [f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})"
            for path in SOURCES for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80]
    assert not long, f"split these into named phases: {long}"
