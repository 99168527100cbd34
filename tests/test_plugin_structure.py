"""The package's shape, read from the source with ``ast`` (nothing imported): no import cycle in
``nora_serve`` (with ``nora_serve.converters`` and ``nora_serve.kernels``), lazy imports inside
functions included; and in the vLLM plugin, ``hooks.py`` is the only module that sets
attributes on vLLM modules, classes or objects. Only the plugin and the serve entry import vLLM
(the serving core and the layers below it not even through another module), and every import
follows the layer order of the README's "Layout" section."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Installed package name -> source folder (pyproject's package-dir).
ROOTS = {"nora_serve": REPO / "nora_serve", "nora_serve.converters": REPO / "converters",
         "nora_serve.kernels": REPO / "kernels"}
PLUGIN = "nora_serve.vllm_plugin"


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, root in ROOTS.items():
        for f in root.rglob("*.py"):
            parts = list(f.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([pkg, *parts])
            out.setdefault(name, f)  # nora_serve/ has no converters/ or kernels/ of its own
    return out


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules that ``name`` imports anywhere in its file (top level or inside a
    function), resolved as Python would."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if _is_package(path) else name.rpartition(".")[0]
    found: set[str] = set()

    def add(target: str) -> None:
        # The deepest known module that the dotted name starts with.
        parts = target.split(".")
        for i in range(len(parts), 0, -1):
            cand = ".".join(parts[:i])
            if cand in known:
                found.add(cand)
                return

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                if f"{mod}.{alias.name}" in known:
                    found.add(f"{mod}.{alias.name}")
                else:
                    add(mod)
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {name: _imports(name, path, known) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as ``[a, b, ..., a]``, or ``None``."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert "nora_serve.vllm_plugin.hooks" in graph[PLUGIN]  # register(): `from . import hooks`, in a function
    assert "nora_serve.vllm_plugin.engine_args" in graph["nora_serve.vllm_plugin.hooks"]
    assert "nora_serve.kernels" in graph["nora_serve.vllm_plugin.punica_gpu"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_the_plugin():
    graph = {k: {m for m in v if m.startswith(PLUGIN)} for k, v in import_graph().items()
             if k.startswith(PLUGIN)}
    assert len(graph) >= 10
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert {"nora_serve.converters", "nora_serve.kernels", "nora_serve.cli.serve"} <= set(graph)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def _vllm_names(tree: ast.AST) -> set[str]:
    """Local names bound to something imported from vLLM (modules, classes, objects)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "vllm" or a.name.startswith("vllm."):
                    names.add(a.asname or a.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module and (
                node.module == "vllm" or node.module.startswith("vllm.")):
            names.update(a.asname or a.name for a in node.names)
    return names


def _root(node: ast.AST) -> ast.AST:
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "type" and node.args:
        return _root(node.args[0])  # type(current_platform).x = ...
    return node


def vllm_attribute_writes(path: Path) -> list[str]:
    """``file:line`` of every write of an attribute onto a vLLM name (``Cls.x = ...``,
    ``setattr(mod, ...)``, ``type(obj).x = ...``), and of every ``nora`` attribute set on an
    object other than ``self`` / ``cls`` (how the plugin used to hang state on vLLM objects)."""
    tree = ast.parse(path.read_text(), str(path))
    vllm = _vllm_names(tree)
    hits = []

    def check(target: ast.AST, line: int) -> None:
        if not isinstance(target, ast.Attribute):
            return
        root = _root(target)
        if isinstance(root, ast.Name) and root.id in vllm:
            hits.append(f"{path.name}:{line} {ast.unparse(target)}")
        elif (target.attr.lstrip("_").startswith("nora") and not
              (isinstance(target.value, ast.Name) and target.value.id in ("self", "cls"))):
            hits.append(f"{path.name}:{line} {ast.unparse(target)}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for t in node.targets:
                for sub in (t.elts if isinstance(t, ast.Tuple) else [t]):
                    check(sub, node.lineno)
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            check(node.target, node.lineno)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("setattr", "delattr")
              and node.args):
            root = _root(node.args[0])
            if isinstance(root, ast.Name) and root.id in vllm:
                hits.append(f"{path.name}:{node.lineno} {node.func.id}({ast.unparse(node.args[0])}, ...)")
    return hits


def test_the_check_sees_patches():
    import tempfile

    src = ("from vllm.lora.model_manager import LoRAModelManager\nimport vllm.lora.utils as lu\n"
           "from vllm.platforms import current_platform\n"
           "def f(manager, model):\n    LoRAModelManager.activate_adapter = None\n    lu._all_lora_classes = ()\n"
           "    type(current_platform).x = 1\n    setattr(LoRAModelManager, 'y', 2)\n"
           "    manager._nora_batch = {1}\n    model.nora_storage = None\n    self_like = 1\n")
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "m.py"
        p.write_text(src)
        assert len(vllm_attribute_writes(p)) == 6, vllm_attribute_writes(p)


def test_only_hooks_sets_attributes_on_vllm():
    plugin = ROOTS["nora_serve"] / "vllm_plugin"
    hits = [h for f in sorted(plugin.glob("*.py")) if f.name != "hooks.py" for h in vllm_attribute_writes(f)]
    assert not hits, hits
    assert vllm_attribute_writes(plugin / "hooks.py")  # and hooks.py does (the check works there)


# -- where vLLM is imported, and the layer order ---------------------------------------------
# vLLM is imported by the plugin and by the CLI entry that runs vLLM's serve command, nowhere else.
VLLM_ALLOWED = ("nora_serve.vllm_plugin", "nora_serve.cli.serve")
# The serving core and everything below it: no vLLM, not even through another module.
VLLM_FREE = ("nora_serve.serving", "nora_serve.methods", "nora_serve.converters", "nora_serve.kernels",
             "nora_serve.train")


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _parents(name: str, known) -> set[str]:
    """The packages above ``name``: importing a module runs their ``__init__`` first."""
    parts = name.split(".")
    return {p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p in known}


def vllm_importers() -> set[str]:
    """The package modules that import vLLM themselves (anywhere in the file)."""
    return {name for name, path in _modules().items() if _vllm_names(ast.parse(path.read_text(), str(path)))}


def vllm_chain(start: str, graph: dict[str, set[str]], direct: set[str]) -> list[str] | None:
    """The shortest chain of imports ``[start, ..., m, "vllm"]`` through which importing
    ``start`` imports vLLM (``direct``: the modules that import it themselves), or ``None``."""
    prev: dict[str, str | None] = {start: None}
    queue = [start]
    for m in queue:
        if m in direct:
            chain = [m]
            while prev[chain[-1]] is not None:
                chain.append(prev[chain[-1]])
            return chain[::-1] + ["vllm"]
        for n in sorted(graph.get(m, set()) | _parents(m, graph)):
            if n not in prev:
                prev[n] = m
                queue.append(n)
    return None


def test_the_vllm_check_follows_imports():
    graph = {"a": {"b"}, "b": {"c"}, "c": set(), "p": set(), "p.x": set(), "d": set()}
    assert vllm_chain("a", graph, {"c"}) == ["a", "b", "c", "vllm"]
    assert vllm_chain("p.x", graph, {"p"}) == ["p.x", "p", "vllm"]  # through its package's __init__
    assert vllm_chain("d", graph, {"c"}) is None
    assert {"nora_serve.vllm_plugin.hooks", "nora_serve.cli.serve"} <= vllm_importers()


def test_vllm_imported_only_by_the_plugin_and_the_serve_entry():
    outside = sorted(m for m in vllm_importers() if not any(_under(m, a) for a in VLLM_ALLOWED))
    assert not outside, f"modules outside {VLLM_ALLOWED} import vLLM: {outside}"


def test_serving_core_and_the_layers_below_import_no_vllm():
    """Not directly, and not through any nora_serve module they import (lazily included)."""
    graph, direct = import_graph(), vllm_importers()
    core = [m for m in graph if _under(m, "nora_serve.serving")]
    assert len(core) >= 10 and "nora_serve.serving.cache.build" in core
    chains = [" -> ".join(c) for m in sorted(graph) if any(_under(m, r) for r in VLLM_FREE)
              for c in [vllm_chain(m, graph, direct)] if c]
    assert not chains, "\n".join(chains)


def _room(module: str) -> str:
    """``nora_serve.serving.cache.build`` -> ``serving``; the package's own ``__init__``: ``nora_serve``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def readme_layers() -> dict[str, int]:
    """The layer line of the README's "Layout" section (``a | b -> c -> ...``), as room -> rank:
    a room may import only rooms of a higher rank."""
    text = (REPO / "README.md").read_text()
    layout = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    lines = [ln.strip("`") for ln in layout.splitlines()
             if ln.startswith("`") and ln.endswith("`") and "->" in ln]
    assert len(lines) == 1, f"README's Layout section needs one layer line, found {lines}"
    return {room.strip(): rank for rank, group in enumerate(lines[0].split("->")) for room in group.split("|")}


def test_imports_follow_the_readme_layer_order():
    layers = readme_layers()
    graph = import_graph()
    rooms = {_room(m) for m in graph}
    assert rooms == set(layers), (f"rooms not in the README's layer line: {sorted(rooms - set(layers))}; "
                                  f"in it but not in the code: {sorted(set(layers) - rooms)}")
    assert layers["vllm_plugin"] < layers["serving"] < layers["converters"] < layers["methods"]
    wrong = sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                   if _room(a) != _room(b) and layers[_room(a)] >= layers[_room(b)])
    assert not wrong, "imports against the README's layer order:\n" + "\n".join(wrong)
