"""The package's import graph has no cycle, the error types are a leaf (dvp.core.errors imports no dvp module), and
every module imports only the layers its folder's __init__ allows ("Imports: ..."), so data flows one way."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dvp"


def _imports() -> dict[str, set[str]]:
    """module -> the dvp modules it imports (at any level of the file, lazy imports included)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dvp"):
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("dvp"))
        graph[name] = found - {name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_and_errors_is_a_leaf() -> None:
    graph = _imports()
    assert "dvp.core.errors" in graph and graph["dvp.core.errors"] == set()
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


ENTRY_POINTS = {"dvp.train.__main__", "dvp.evaluate.__main__", "dvp.sample", "dvp.info"}
"""`python -m dvp.<command>` under the names the README documents: each only calls dvp.cli.<command>.main."""


def _layer(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def _allowed(layer: str) -> set[str] | None:
    """The layers `layer` may import, from the 'Imports:' line of its __init__ docstring (None: any)."""
    doc = ast.get_docstring(ast.parse((PACKAGE / layer / "__init__.py").read_text())) or ""
    line = re.search(r"^Imports: (.*)$", doc, re.M)
    assert line, f"dvp/{layer}/__init__.py says nothing of what it may import (an 'Imports: ...' line)"
    if line[1].startswith("any layer"):
        return None
    return {layer} | set(re.findall(r"dvp\.(\w+)", line[1]))


def _violations(graph: dict[str, set[str]]) -> list[str]:
    layers = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    bad = []
    for module, imported in sorted(graph.items()):
        if module in ENTRY_POINTS or module == "dvp":      # the root holds only __version__
            continue
        layer = _layer(module)
        assert layer in layers, f"{module} lies outside every layer folder"
        allowed = _allowed(layer)
        bad += [f"{module} imports {dep}" for dep in sorted(imported)
                if allowed is not None and dep != "dvp" and _layer(dep) not in allowed]
    return bad


def test_every_module_imports_only_the_layers_its_folder_allows() -> None:
    assert _violations(_imports()) == []


def test_entry_points_only_forward_to_the_commands() -> None:
    graph = _imports()
    for module in ENTRY_POINTS:
        assert {_layer(d) for d in graph[module]} == {"cli"}, module


def test_the_layer_check_finds_an_upward_import() -> None:
    with pytest.raises(AssertionError):
        assert _violations({"dvp.model.vae": {"dvp.train.loop"}}) == []
    assert _violations({"dvp.train.loop": {"dvp.model.vae"}}) == []


GROUND_FLOOR_WORDS = ("digits", "mnist", "omniglot", "cifar10", "cifar", "npz", "dvp_vae", "vampprior", "ladder",
                      "groupnorm", "bernoulli", "logistic_mixture", "unet")
"""What the ground floor (dvp/core) must not name: the datasets, the models, their parts (dvp.data, dvp.model)."""


def _ground_floor_mentions(files: dict[str, str]) -> list[str]:
    """'file: word' for each model or dataset word named in `files` (path -> text), code and prose alike."""
    return [f"{path}: {word}" for path, text in sorted(files.items()) for word in GROUND_FLOOR_WORDS
            if re.search(rf"\b{word}\b", text, re.I)]


def test_the_ground_floor_names_no_model_or_dataset() -> None:
    core = {str(p.relative_to(PACKAGE)): p.read_text() for p in (PACKAGE / "core").rglob("*.py")}
    assert _ground_floor_mentions(core) == []


def test_the_ground_floor_check_finds_a_dataset_and_a_model() -> None:
    old = 'DATASET_SHAPES = {"digits": (1, 8, 8)}\nCHOICES = {"model.name": ("dvp_vae", "ladder", "vampprior")}'
    assert _ground_floor_mentions({"core/config.py": old}) == [
        "core/config.py: digits", "core/config.py: dvp_vae", "core/config.py: vampprior", "core/config.py: ladder"]
    assert _ground_floor_mentions({"x": "(GroupNorm with 16 groups)"}) == ["x: groupnorm"]
