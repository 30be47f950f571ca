"""The house rules, checked: layers only point down, no import circles, imports at the top.

Layers (docs/DESIGN.md, "Who may import whom"): entry points -> sweep -> engine | outputs ->
models -> weights -> files/config (and the root package's ``__version__``/``config_dir``).
``dreamjax.bench`` is outside the product: it may import anything, nothing imports it. The engine
and the outputs sit side by side and never import each other (the engine does no I/O, the outputs
do not dream). A module may import anything in its own package.
"""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "dreamjax"

LAYER = {"dreamjax": 0, "dreamjax.files": 0, "dreamjax.config": 0, "dreamjax.weights": 1,
         "dreamjax.models": 2, "dreamjax.engine": 3, "dreamjax.outputs": 3, "dreamjax.sweep": 4,
         "dreamjax.cli": 5, "dreamjax.weights_cli": 5, "dreamjax.bench": 6}
# Third-party modules a function may import lazily: optional dependencies only.
OPTIONAL = {"matplotlib", "tensorflow", "keras", "torch", "cv2", "av", "imageio", "imageio_ffmpeg"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _unit(module: str) -> str:
    """The layer unit a module belongs to: its subpackage, or itself for a top-level module."""
    parts = module.split(".")
    if len(parts) == 1:
        return "dreamjax"
    unit = ".".join(parts[:2])
    return unit if unit in LAYER else "dreamjax"


def _imports(path: Path, *, with_reason: bool = False):
    """(imported module, line, at module level?) for every import in a file; with_reason: also
    whether the import or the line above it says why it is lazy (``# lazy: ...``)."""
    text = path.read_text(encoding="utf-8")
    src = text.splitlines()
    tree = ast.parse(text)
    top = set(id(n) for n in tree.body)
    me = _module_name(path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this module's package
                base = me.split(".")[: -node.level + (1 if path.name == "__init__.py" else 0) or None]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            names = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        said = any("# lazy:" in src[i] for i in (node.lineno - 2, node.lineno - 1) if 0 <= i < len(src))
        for n in names:
            yield (n, node.lineno, id(node) in top, said) if with_reason else (n, node.lineno, id(node) in top)


def _graph():
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    edges = {}
    for m, p in modules.items():
        edges[m] = {(n, line, top) for n, line, top in _imports(p) if n in modules}
    return modules, edges


def test_layers_only_point_down():
    modules, edges = _graph()
    bad = []
    for m, deps in edges.items():
        src = _unit(m)
        for d, line, top in deps:
            dst = _unit(d)
            if m == "dreamjax" and not top:  # the root package's lazy exports (load_backbone...)
                continue
            if src == dst or dst == "dreamjax" and d == "dreamjax":
                continue
            if dst == "dreamjax.bench" or LAYER[dst] >= LAYER[src]:
                bad.append(f"{modules[m].relative_to(PKG.parent)}:{line}: {src} imports {d} ({dst})")
    assert not bad, "imports that point up or sideways:\n" + "\n".join(sorted(bad))


def test_no_import_circles():
    _, edges = _graph()
    graph = {m: sorted({d for d, _, _ in deps if d != m}) for m, deps in edges.items()}
    # A package's __init__ is imported by its submodules' import; count a subpackage import as
    # an edge to the package module itself only (which the graph already holds).
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in graph.get(m, ()):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_imports_at_the_top_unless_optional():
    late = []
    for p in sorted(PKG.rglob("*.py")):
        if p == PKG / "__init__.py":  # the root package: lazy by design (no JAX at `import dreamjax`)
            continue
        for n, line, top, said in _imports(p, with_reason=True):
            if not top and not said and n.split(".")[0] not in OPTIONAL:
                late.append(f"{p.relative_to(PKG.parent)}:{line}: {n}")
    assert not late, "imports inside functions (move them to the top, or add an optional dependency " \
                     "to OPTIONAL with a reason):\n" + "\n".join(late)


def test_the_checks_catch_a_violation(tmp_path, monkeypatch):
    """The graph checks above can fail: an upward import planted in a copy of the tree is reported."""
    import shutil

    copy = tmp_path / "dreamjax"
    shutil.copytree(PKG, copy)
    (copy / "files.py").write_text((copy / "files.py").read_text() + "\nfrom dreamjax.sweep import grid\n")
    monkeypatch.setitem(globals(), "PKG", copy)
    try:
        test_layers_only_point_down()
    except AssertionError as e:
        assert "dreamjax.files imports dreamjax.sweep.grid" in str(e) or "files.py" in str(e)
    else:
        raise AssertionError("an upward import was not reported")
