"""Code-structure figures of the package: what a reader pays for.

Prints, for ``src/scfm_adapt`` (or ``--src``):

- the ``--top`` biggest files by lines;
- *calls across feature classes*: inside a model class of ``model/`` (a feature mixin or
  a model), every ``self.<name>`` whose ``<name>`` is defined by another local class of
  ``model/`` that is neither one of its own bases nor the declared interface (the model
  base class ``BaseModel``, and scvi-tools' model base classes). Such a call is a hidden
  contract between two siblings;
- import cycles between the package's modules (``from . import x`` inside a function
  counts: a deferred import is still a dependency);
- imports that go against the layers (``nn → diffusion → module → train → model →
  tl/pl``; ``data``, ``metrics``, ``baselines`` below ``model``).

``python benchmarks/architecture.py`` (no data, a second or two).
"""

from __future__ import annotations

import argparse
import ast
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "scfm_adapt"

#: Rank of each sub-package; a module may import only from ranks at or below its own
#: (``errors`` and the package root are importable from anywhere).
LAYERS = {
    "errors": 0,
    "nn": 1,
    "diffusion": 2,
    "datasets": 2,
    "data": 3,
    "module": 4,
    "train": 5,
    "metrics": 5,
    "baselines": 6,
    "model": 7,
    "tl": 8,
    "pl": 8,
    "benchmark": 9,
    "cli": 9,
}


def module_name(path: Path, src: Path) -> str:
    rel = path.relative_to(src.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def resolve(node: ast.ImportFrom, current: str, is_package: bool) -> list[str]:
    """Absolute module names an ``ImportFrom`` reaches (``from . import a, b`` gives both)."""
    if node.level == 0:
        base = node.module or ""
    else:
        pkg = current.split(".") if is_package else current.split(".")[:-1]
        pkg = pkg[: len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([node.module] if node.module else []))
    if node.module is None:
        return [f"{base}.{a.name}" for a in node.names]
    return [base]


def import_graph(src: Path) -> dict[str, set[str]]:
    files = sorted(src.rglob("*.py"))
    names = {module_name(f, src) for f in files}
    graph: dict[str, set[str]] = defaultdict(set)
    for f in files:
        me = module_name(f, src)
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                targets = resolve(node, me, f.name == "__init__.py")
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                while t and t not in names:  # from .pkg import name -> the package module
                    t = t.rpartition(".")[0]
                if t and t != me and t.startswith(src.name):
                    graph[me].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(set(graph) | {w for ws in graph.values() for w in ws}):
        if v not in index:
            visit(v)
    return out


def _layer(mod: str) -> tuple[str, int | None]:
    parts = mod.split(".")
    top = parts[1] if len(parts) > 1 else ""
    return top, LAYERS.get(top)


def _is_package_init(mod: str, graph: dict[str, set[str]], src: Path) -> bool:
    return (src.parent / Path(*mod.split(".")) / "__init__.py").exists()


def layer_violations(graph: dict[str, set[str]], src: Path) -> list[str]:
    bad = []
    for a, targets in sorted(graph.items()):
        top_a, rank_a = _layer(a)
        if rank_a is None:
            continue
        for b in sorted(targets):
            top_b, rank_b = _layer(b)
            if rank_b is None or top_a == top_b:
                continue
            if rank_b > rank_a:
                bad.append(f"{a} -> {b}")
    return bad


class _ClassInfo:
    def __init__(self, name: str, module: str, node: ast.ClassDef):
        self.name, self.module, self.node = name, module, node
        self.bases = [ast.unparse(b).split(".")[-1] for b in node.bases]
        self.defined = {
            n.name for n in node.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
        } | {
            t.id
            for n in node.body
            if isinstance(n, ast.Assign | ast.AnnAssign)
            for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
            if isinstance(t, ast.Name)
        }

    def self_uses(self) -> set[str]:
        used = set()
        for n in ast.walk(self.node):
            if (
                isinstance(n, ast.Attribute)
                and isinstance(n.value, ast.Name)
                and n.value.id in ("self", "cls")
            ):
                used.add(n.attr)
        return used


def model_classes(src: Path) -> dict[str, _ClassInfo]:
    out = {}
    for f in sorted((src / "model").rglob("*.py")):
        mod = module_name(f, src)
        for node in ast.parse(f.read_text()).body:
            if isinstance(node, ast.ClassDef):
                out[node.name] = _ClassInfo(node.name, mod, node)
    return out


def ancestors(name: str, classes: dict[str, _ClassInfo]) -> set[str]:
    seen, todo = set(), [name]
    while todo:
        c = todo.pop()
        for b in classes[c].bases if c in classes else []:
            if b in classes and b not in seen:
                seen.add(b)
                todo.append(b)
    return seen


def external_interface() -> set[str]:
    """What scvi-tools' model base classes define: every model has it, so using it is
    using the declared interface, not a sibling."""
    from scvi.model.base import BaseModelClass, UnsupervisedTrainingMixin

    return set(dir(BaseModelClass)) | set(dir(UnsupervisedTrainingMixin))


def cross_calls(src: Path) -> list[tuple[str, str, str]]:
    """``(class, name, owner)`` for each sibling-defined name a model class uses."""
    classes = model_classes(src)
    external = external_interface()
    base = classes.get("BaseModel")
    if base is not None:
        external |= base.defined
    owners: dict[str, set[str]] = defaultdict(set)
    for c in classes.values():
        for n in c.defined:
            owners[n].add(c.name)
    out = []
    for c in classes.values():
        allowed = {c.name} | ancestors(c.name, classes)
        for n in sorted(c.self_uses() - c.defined - external):
            others = owners.get(n, set()) - allowed
            if others and not (owners[n] & allowed):
                out.append((c.name, n, ",".join(sorted(others))))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", type=Path, default=SRC)
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--verbose", action="store_true", help="list every cross call")
    a = p.parse_args()
    src = a.src.resolve()
    files = sorted(src.rglob("*.py"))
    sizes = sorted(((len(f.read_text().splitlines()), f) for f in files), reverse=True)
    print(f"{sum(s for s, _ in sizes)} lines in {len(files)} files under {src.name}/")
    print(f"\n{a.top} biggest files:")
    for n, f in sizes[: a.top]:
        print(f"  {n:5d}  {f.relative_to(src)}")
    calls = cross_calls(src)
    print(f"\ncalls across feature classes of model/: {len(calls)}")
    if a.verbose:
        for c, n, o in calls:
            print(f"  {c}.self.{n} -> {o}")
    graph = import_graph(src)
    # The package root re-exports everything: an import of it (``from .. import
    # __version__``) would tie every module into one cycle, so it is left out here.
    root = src.name
    graph = {k: {v for v in vs if v != root} for k, vs in graph.items() if k != root}
    cyc = cycles(graph)
    print(f"import cycles: {len(cyc)}")
    for c in cyc:
        print("  " + " <-> ".join(m.removeprefix("scfm_adapt.") for m in c))
    bad = layer_violations(graph, src)
    print(f"imports against the layers: {len(bad)}")
    for b in bad:
        print("  " + b)


if __name__ == "__main__":
    main()
