"""autopar's imports point one way (program < rules < cost < search < runtime < passes <
api/backend) and form no cycle: read off the sources with ast, the graph checked with
networkx."""

from __future__ import annotations

import ast
import pathlib

import networkx as nx

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Layers, lowest first; a module may import its own layer and those below. The base modules
# (errors, units, options, _torch) sit under every layer; the package's face above all.
LAYERS = {"_base": 0, "program": 1, "rules": 2, "cost": 3, "options": 3.5, "search": 4, "runtime": 5,
          "passes": 6, "api": 7, "backend": 7, "cli_models": 7.5, "cli": 8, "__main__": 8,
          "__init__": 8}
BASE = {"errors", "units", "_torch"}


def modules() -> dict:
    """Module name -> source path, for autopar and its passes (installed as autopar.passes)."""
    out = {}
    for path in sorted((ROOT / "autopar").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted((ROOT / "passes").glob("*.py")):
        name = "autopar.passes" + ("" if path.stem == "__init__" else f".{path.stem}")
        out[name] = path
    return out


def layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return LAYERS["__init__"]
    head = parts[1]
    return LAYERS["_base"] if head in BASE else LAYERS[head]


def imports(module: str, path: pathlib.Path, known: dict) -> set:
    """The autopar modules ``module`` imports, anywhere in its source."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                full = f"{target}.{alias.name}"
                out.add(full if full in known else target)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return {m for m in out if m in known and m != module}


def import_graph() -> nx.DiGraph:
    known = modules()
    g = nx.DiGraph()
    for module, path in known.items():
        g.add_node(module)
        for target in imports(module, path, known):
            if target != "autopar":
                g.add_edge(module, target)
    return g


def test_imports_point_from_higher_layers_to_lower_ones():
    g = import_graph()
    against = sorted(f"{a} -> {b}" for a, b in g.edges if layer(b) > layer(a))
    assert not against, "imports against the layer order:\n" + "\n".join(against)


def test_there_is_no_import_cycle():
    cycles = list(nx.simple_cycles(import_graph()))
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def _dotted(node) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id] + parts[::-1]) if isinstance(node, ast.Name) else ""


def test_private_torch_names_are_reached_only_through_autopar_torch():
    """autopar/_torch.py is the one module naming torch's private APIs (with the versions
    checked); everywhere else imports or reads only public torch names."""
    found = []
    for module, path in modules().items():
        if module == "autopar._torch":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch"):
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.Attribute):
                names = [_dotted(node)]
            else:
                continue
            found += [f"{module}: {n}" for n in names if n.split(".")[0] == "torch" and
                      any(p.startswith("_") and not p.startswith("__") for p in n.split("."))]
    assert not found, "private torch names outside autopar/_torch.py:\n" + \
        "\n".join(sorted(set(found)))
