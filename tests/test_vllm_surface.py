"""The plugin's vLLM table (``nora_serve/vllm_plugin/vllm_surface.py``): clean against the
installed vLLM; equal to what the code touches, both ways (every vLLM import, every write onto
a vLLM class or object, every override, every private read of a vLLM name has a row, and every
row is used); and clean against vLLM 0.33's source, with the same signatures as 0.32 for what
the plugin wraps, overrides or calls.
"""

from __future__ import annotations

import ast
import importlib
import os
import types
from pathlib import Path

import pytest

from nora_serve.vllm_plugin import vllm_surface as vs
from nora_serve.vllm_plugin.vllm_source import SourceTree

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_DIR = ROOT / "nora_serve" / "vllm_plugin"
# The code that touches vLLM: the plugin, and the CLI entry that runs vLLM's serve command.
CODE = sorted(PLUGIN_DIR.glob("*.py")) + [ROOT / "nora_serve" / "cli" / "serve.py"]
# The serving core imports no vLLM but reads the vLLM config objects it is handed.
CORE = sorted((ROOT / "nora_serve" / "serving").rglob("*.py"))
# Where attributes are set on vLLM objects (tests/test_plugin_structure.py: nowhere else on a
# vLLM name), and the modules that set vLLM's own fields on objects they are handed.
OBJECT_WRITERS = ("hooks.py", "engine_args.py")
WRITE_KINDS = ("write", "wrap", "replace")
SRC_033 = Path(os.environ.get("NORA_VLLM_SRC", "/work/vllm033/src"))
GET_033 = ("mkdir -p /work/vllm033 && cd /work/vllm033 && pip download vllm==0.33.0 --no-deps -d . "
           "&& unzip -q vllm-0.33.0-*.whl 'vllm/*' -d src   (or set NORA_VLLM_SRC to a directory "
           "holding vllm/)")


def _places(row: vs.Name) -> set[tuple[str, str]]:
    """Every ``(module, path)`` the row names, in any supported version."""
    return {(row.module, row.path)} | {(m, p) for _, m, p in row.moved}


def _is_vllm(module: str | None) -> bool:
    return bool(module) and (module == "vllm" or module.startswith("vllm."))


def _own(attr: str) -> bool:
    """Named as the plugin's own (``nora_*`` on layers, ``_nora_*``)."""
    return attr.lstrip("_").startswith("nora")


# -- the scanner --------------------------------------------------------------------------------
class Scan:
    """What one module's code touches of vLLM, read with ``ast``."""

    def __init__(self, text: str, name: str = "<snippet>"):
        self.name, self.tree = name, ast.parse(text, name)
        self.vllm: dict[str, tuple[str, str]] = {}  # local name -> (module, path) in vLLM
        self.other: set[str] = set()  # names bound by the plugin's or other libraries' imports
        self.imports: list[tuple[str, str | None, int]] = []  # (module, name or None, line)
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if _is_vllm(a.name):
                        self.imports.append((a.name, None, node.lineno))
                        local = a.asname or a.name.split(".")[0]
                        self.vllm[local] = (a.name if a.asname else "vllm", "")
                    else:
                        self.other.add(a.asname or a.name.split(".")[0])
            elif isinstance(node, ast.ImportFrom):
                for a in node.names:
                    if not node.level and _is_vllm(node.module):
                        self.imports.append((node.module, a.name, node.lineno))
                        self.vllm[a.asname or a.name] = (node.module, a.name)
                    else:
                        self.other.add(a.asname or a.name)
        # Local aliases of vLLM names (platform_cls = type(current_platform)) and the names bound
        # to the plugin's own objects (state = WorkerState.from_vllm_config(...)), to a fixpoint.
        self.plugin = set(self.other)
        changed = True
        while changed:
            changed = False
            for node in ast.walk(self.tree):
                if not isinstance(node, ast.Assign):
                    continue
                for t in node.targets:
                    if not isinstance(t, ast.Name) or t.id in self.vllm or t.id in self.plugin:
                        continue
                    value = node.value
                    if isinstance(value, ast.Call) and ast.unparse(value.func) == "type" and value.args:
                        value = value.args[0]
                    where = self.resolve(value)
                    if where is not None and isinstance(value, (ast.Name, ast.Attribute)):
                        self.vllm[t.id], changed = where, True
                    elif isinstance(self.root(node.value), ast.Name) and self.root(node.value).id in self.plugin:
                        self.plugin.add(t.id)
                        changed = True

    @staticmethod
    def root(node: ast.AST) -> ast.AST:
        while True:
            if isinstance(node, (ast.Attribute, ast.Subscript)):
                node = node.value
            elif isinstance(node, ast.Call):
                node = node.args[0] if ast.unparse(node.func) == "type" and node.args else node.func
            else:
                return node

    def resolve(self, node: ast.AST) -> tuple[str, str] | None:
        """``(module, path)`` in vLLM of a name or attribute chain on a vLLM name."""
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "type" and node.args:
            return self.resolve(node.args[0])
        if isinstance(node, ast.Name):
            return self.vllm.get(node.id)
        if isinstance(node, ast.Attribute):
            owner = self.resolve(node.value)
            if owner is not None:
                module, path = owner
                return module, f"{path}.{node.attr}" if path else node.attr
        return None

    def _targets(self):
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Assign):
                for t in node.targets:
                    for sub in (t.elts if isinstance(t, ast.Tuple) else [t]):
                        yield sub, node.lineno
            elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
                yield node.target, node.lineno

    def class_writes(self) -> list[tuple[tuple[str, str], int]]:
        """Writes onto a vLLM module, class or module-level object (``Cls.x = ...``,
        ``type(obj).x = ...``, ``setattr(Cls, "x", ...)``): ``((module, path), line)``."""
        out = [(w, line) for t, line in self._targets()
               if isinstance(t, ast.Attribute) and (w := self.resolve(t)) is not None]
        for node in ast.walk(self.tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr"
                    and len(node.args) > 1):
                owner = self.resolve(node.args[0])
                if owner is not None:
                    attr = node.args[1].value if isinstance(node.args[1], ast.Constant) else "?"
                    out.append(((owner[0], f"{owner[1]}.{attr}".lstrip(".")), node.lineno))
        return out

    def object_writes(self) -> list[tuple[str, int]]:
        """Attributes set on objects the code is handed (not a vLLM name, not an object of the
        plugin's own, not ``nora_*``): ``(attribute, line)``; ``setattr(obj, name, ...)`` with a
        computed name is ``"?"``."""
        out = []
        in_class = {id(n) for c in ast.walk(self.tree) if isinstance(c, ast.ClassDef) for n in ast.walk(c)}
        for t, line in self._targets():
            if isinstance(t, ast.Attribute) and not _own(t.attr):
                root = self.root(t)
                if id(t) in in_class and isinstance(root, ast.Name) and root.id == "self":
                    continue  # a class's own attribute (vLLM's, where it extends vLLM: self_writes)
                if isinstance(root, ast.Name) and root.id not in self.vllm and root.id not in self.plugin:
                    out.append((t.attr, line))
        # for field in ("a", "b"): setattr(obj, field, ...)
        loops = {n.target.id: [c.value for c in n.iter.elts if isinstance(c, ast.Constant)]
                 for n in ast.walk(self.tree) if isinstance(n, ast.For) and isinstance(n.target, ast.Name)
                 and isinstance(n.iter, (ast.Tuple, ast.List))}
        for node in ast.walk(self.tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr"
                    and node.args and self.resolve(node.args[0]) is None):
                arg = node.args[1] if len(node.args) > 1 else None
                names = ([arg.value] if isinstance(arg, ast.Constant) else
                         loops.get(arg.id, ["?"]) if isinstance(arg, ast.Name) else ["?"])
                out += [(a, node.lineno) for a in names]
        return out

    def reads(self, private_only: bool = True) -> list[tuple[str, tuple[str, str] | None, int]]:
        """Attribute reads: ``(attribute, (module, path) where it is on a vLLM name, line)``;
        ``private_only``: ``_x`` names (not dunders) only, on anything but another library's
        module (``torch._dynamo``)."""
        out = []
        for node in ast.walk(self.tree):
            if not (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load)):
                continue
            where = self.resolve(node)
            if private_only:
                if not node.attr.startswith("_") or node.attr.startswith("__"):
                    continue
                root = self.root(node)
                if where is None and isinstance(root, ast.Name) and root.id in self.other:
                    continue
            elif where is None:
                continue
            out.append((node.attr, where, node.lineno))
        return out

    def defined(self) -> set[str]:
        """Names this module defines: functions, classes, class and module values, attributes
        it sets on ``self``."""
        out = set()
        for node in ast.walk(self.tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                out.add(node.name)
                body = node.body
                for sub in body:
                    if isinstance(sub, ast.Assign):
                        out |= {t.id for t in sub.targets if isinstance(t, ast.Name)}
                    elif isinstance(sub, ast.AnnAssign) and isinstance(sub.target, ast.Name):
                        out.add(sub.target.id)
        for t, _ in self._targets():
            if isinstance(t, ast.Name):
                out.add(t.id)
            elif isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                out.add(t.attr)
        return out

    def identifiers(self, skip: set[str] = frozenset()) -> set[str]:
        """Every name the code uses (names, attributes, imported names, definitions, keyword
        arguments, string constants that are not docstrings); ``skip``: module-level names whose
        statements are left out (the table itself)."""
        docs = set()
        for node in ast.walk(self.tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
                first = node.body[0]
                if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                    docs.add(id(first.value))
        out = set()
        for stmt in self.tree.body:
            if isinstance(stmt, (ast.Assign, ast.AnnAssign)) and any(
                    isinstance(t, ast.Name) and t.id in skip
                    for t in (stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target])):
                continue
            for node in ast.walk(stmt):
                if isinstance(node, ast.Name):
                    out.add(node.id)
                elif isinstance(node, ast.Attribute):
                    out.add(node.attr)
                elif isinstance(node, ast.alias):
                    out |= set(node.name.split(".")) | {node.asname}
                elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    out.add(node.name)
                elif isinstance(node, ast.keyword):
                    out.add(node.arg)
                elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                    out.add(node.value)
        return out


# -- classes that extend vLLM's: overrides and attributes set on self (run time, MRO) ----------
def vllm_side_classes() -> list[type]:
    """The plugin's classes with a vLLM class among their bases, and the shared-basis layer
    classes ``layers.layer_classes`` makes (its mixin goes in front of vLLM's classes)."""
    from nora_serve.serving.state import WorkerState
    from nora_serve.vllm_plugin import layers

    out = []
    for f in sorted(PLUGIN_DIR.glob("*.py")):
        mod = importlib.import_module(f"nora_serve.vllm_plugin.{f.stem}" if f.stem != "__init__"
                                      else "nora_serve.vllm_plugin")
        out += [c for c in vars(mod).values() if isinstance(c, type) and c.__module__ == mod.__name__]
    out += list(layers.layer_classes(WorkerState()))
    return [c for c in out if any(_is_vllm(k.__module__) for k in c.__mro__)]


def _split(cls: type) -> tuple[list[type], list[type]]:
    """(the plugin's classes in front of the first vLLM class in the MRO, the vLLM classes)."""
    mro = cls.__mro__
    first = next(i for i, k in enumerate(mro) if _is_vllm(k.__module__))
    return list(mro[:first]), [k for k in mro if _is_vllm(k.__module__)]


def overrides(cls: type) -> list[tuple[str, type]]:
    """``(method, plugin class)`` of each method a plugin class in front of vLLM's defines
    again (a vLLM class further down the MRO has it)."""
    own, vllm = _split(cls)
    return [(name, k) for k in own for name, v in vars(k).items()
            if isinstance(v, (types.FunctionType, staticmethod, classmethod, property))
            and any(name in vars(b) for b in vllm)]


def self_writes(cls: type) -> list[tuple[str, type]]:
    """``(attribute, plugin class)`` of each ``self.x = ...`` in a plugin class in front of
    vLLM's where ``x`` is vLLM's (a vLLM class of the MRO has it or sets it)."""
    import inspect
    import textwrap

    own, vllm = _split(cls)
    out = []
    for k in own:
        try:
            source = textwrap.dedent(inspect.getsource(k))
        except OSError:  # made by type() (layer_classes): no body of its own
            continue
        for t, _ in Scan(source)._targets():
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                if not _own(t.attr) and any(vs._declares(b, t.attr) or vs._sets(b, t.attr) for b in vllm):
                    out.append((t.attr, k))
    return sorted(set(out), key=lambda x: x[0])


def _owner_in(row: vs.Name, cls: type) -> bool:
    module, path = row.at(vs.version_of(__import__("vllm").__version__))
    try:
        owner = vs._walk(module, path.rpartition(".")[0])
    except Exception:  # noqa: BLE001 - e.g. a GPU-only module
        return False
    return owner in cls.__mro__


# -- the comparison -----------------------------------------------------------------------------
def scans(files=None) -> dict[str, Scan]:
    return {f.name if f.parent == PLUGIN_DIR else f"cli/{f.name}": Scan(f.read_text(), f.name)
            for f in (files or CODE)}


def _read_has_row(where: tuple[str, str], places: set[tuple[str, str]]) -> bool:
    """A read through a vLLM name is in the table: its place; a class a row names a member of
    (``Scheduler`` in ``Scheduler.__init__.__wrapped__``); or something read off a row's value
    that is not a class or module (``LoRAResolverRegistry.resolvers.get``)."""
    import inspect

    module, path = where
    parts = path.split(".")
    while len(parts) > 1 and parts[-1].startswith("__") and (module, ".".join(parts)) not in places:
        parts.pop()  # EngineArgs.from_cli_args.__func__
    path = ".".join(parts)
    if not path or (module, path) in places:
        return True
    if any(m == module and p.startswith(path + ".") for m, p in places):
        return True
    for i in range(len(parts) - 1, 0, -1):
        if (module, ".".join(parts[:i])) in places:
            try:
                value = vs._walk(module, ".".join(parts[:i]))
            except Exception:  # noqa: BLE001
                return False
            return not (inspect.isclass(value) or inspect.ismodule(value))
    return False


def code_without_rows(table, code: dict[str, Scan], classes=None) -> list[str]:
    """What the code touches of vLLM that has no row in ``table``."""
    problems = []
    places = {p for row in table for p in _places(row)}
    modules = {m for m, _ in places}
    defined = set().union(*(Scan(f.read_text()).defined() for f in CODE + CORE
                            if f.name not in ("vllm_surface.py",)))

    def attr_rows(attr, kinds=None):
        return [r for r in table if r.attr == attr and (kinds is None or r.kind in kinds)]

    for name, scan in code.items():
        for module, imported, line in scan.imports:
            ok = (module in modules if imported is None else
                  any(m == module and p.split(".")[0] == imported for m, p in places)
                  or f"{module}.{imported}" in modules)
            if not ok:
                problems.append(f"{name}:{line} imports {module}{':' + imported if imported else ''}: no row")
        for (module, path), line in scan.class_writes():
            if not any((module, path) in _places(r) for r in table if r.kind in WRITE_KINDS):
                problems.append(f"{name}:{line} sets {module}:{path}: no write/wrap/replace row")
        if name in OBJECT_WRITERS:
            for attr, line in scan.object_writes():
                if not attr_rows(attr, WRITE_KINDS):
                    problems.append(f"{name}:{line} sets .{attr} on a vLLM object: no write row")
        for attr, where, line in scan.reads(private_only=True):
            if where is None and attr in defined:
                continue  # the plugin's own
            if where is not None and not any(where in _places(r) for r in table):
                problems.append(f"{name}:{line} reads {where[0]}:{where[1]}: no row")
            elif where is None and not attr_rows(attr):
                problems.append(f"{name}:{line} reads .{attr} (vLLM's private): no row")
        for attr, where, line in scan.reads(private_only=False):
            if not _read_has_row(where, places):
                problems.append(f"{name}:{line} reads {where[0]}:{where[1]}: no row")
    for cls in (vllm_side_classes() if classes is None else classes):
        for method, k in overrides(cls):
            if not any(_owner_in(r, cls) for r in attr_rows(method, ("override",))):
                problems.append(f"{k.__name__}.{method} overrides vLLM's: no override row")
        for attr, k in self_writes(cls):
            if not any(_owner_in(r, cls) for r in attr_rows(attr, ("write",))):
                problems.append(f"{k.__name__} sets self.{attr}, vLLM's: no write row")
    return problems


def rows_without_code(table, code: dict[str, Scan]) -> list[str]:
    """Rows whose name the code does not use (the last part of their path)."""
    used = set()
    for name, scan in code.items():
        used |= scan.identifiers(skip={"TABLE"} if name == "vllm_surface.py" else set())
    for f in CORE:
        used |= Scan(f.read_text(), f.name).identifiers()
    return [f"{r.module}:{r.path} ({r.kind}): not used by the code" for r in table
            if r.attr not in used]


# -- the scanner, on snippets ---------------------------------------------------------------------
SNIPPET = '''
import functools
import vllm.lora.utils as lu
from vllm.lora.model_manager import LoRAModelManager
from vllm.platforms import current_platform
from nora_serve.serving.state import WorkerState

def install(vllm_config):
    state = WorkerState.from_vllm_config(vllm_config)
    platform_cls = type(current_platform)
    platform_cls.get_punica_wrapper = classmethod(lambda cls: "x")
    lu._all_lora_classes = ()
    setattr(LoRAModelManager, "deactivate_adapter", None)
    orig = LoRAModelManager._create_lora_modules

    def _create_lora_modules(self):
        manager = self._adapter_manager
        manager._last_slot_layout = None
        vllm_config.lora_config = None
        state.step_adapters = {1}
        self.nora_sub_modules = []
        functools._private_thing
        return manager._registered_adapters, self._own_helper()

    LoRAModelManager._create_lora_modules = _create_lora_modules
'''


def test_scanner_on_a_snippet():
    scan = Scan(SNIPPET)
    assert {(m, n) for m, n, _ in scan.imports} == {
        ("vllm.lora.utils", None), ("vllm.lora.model_manager", "LoRAModelManager"),
        ("vllm.platforms", "current_platform")}
    assert sorted(w for w, _ in scan.class_writes()) == [
        ("vllm.lora.model_manager", "LoRAModelManager._create_lora_modules"),
        ("vllm.lora.model_manager", "LoRAModelManager.deactivate_adapter"),
        ("vllm.lora.utils", "_all_lora_classes"),
        ("vllm.platforms", "current_platform.get_punica_wrapper")]
    # state is the plugin's (made by WorkerState), nora_* is the plugin's own attribute.
    assert sorted(a for a, _ in scan.object_writes()) == ["_last_slot_layout", "lora_config"]
    reads = {(a, w) for a, w, _ in scan.reads()}
    assert reads == {("_adapter_manager", None), ("_registered_adapters", None), ("_own_helper", None),
                     ("_create_lora_modules", ("vllm.lora.model_manager", "LoRAModelManager._create_lora_modules"))}
    assert "_own_helper" not in Scan(SNIPPET).defined() and "_create_lora_modules" in Scan(SNIPPET).defined()
    ids = scan.identifiers()
    assert {"_last_slot_layout", "get_punica_wrapper", "deactivate_adapter"} <= ids


def test_the_comparison_fails_on_a_missing_row_or_an_unlisted_patch():
    code = scans()
    assert not code_without_rows(vs.TABLE, code, classes=[])
    # A row removed: each kind of use reports it.
    for path in ("EngineArgs.add_cli_args",  # a wrap (a write onto a vLLM class)
                 "LoRAModelManager._last_slot_layout",  # a write onto a vLLM object
                 "LoRAModelManager._registered_adapters",  # a private read
                 "LoRAConfig.max_loras",  # a read through a vLLM name
                 "ErrorResponse"):  # an import
        table = [r for r in vs.TABLE if r.path != path]
        assert any(path.split(".")[-1] in p for p in code_without_rows(table, code, classes=[])), path
    classes = vllm_side_classes()
    for path in ("BaseLinearLayerWithLoRA._apply_lora_to_output", "PunicaWrapperCPU.add_shrink",
                 "BaseLinearLayerWithLoRA._enable_aux_cuda_stream", "PunicaWrapperBase.is_prefill"):
        table = [r for r in vs.TABLE if r.path != path]
        assert any(path.split(".")[-1] in p for p in code_without_rows(table, {}, classes)), path
    # A patch added without a row.
    patch = ("\ndef _more(s):\n    from vllm.v1.core.sched.scheduler import Scheduler\n"
             "    Scheduler.update_from_output = None\n    s.max_num_running_reqs = 1\n    s._free_request(1)\n")
    extra = dict(code, **{"hooks.py": Scan((PLUGIN_DIR / "hooks.py").read_text() + patch, "hooks.py")})
    problems = code_without_rows(vs.TABLE, extra, classes=[])
    assert any("Scheduler.update_from_output" in p for p in problems), problems
    assert any(".max_num_running_reqs" in p for p in problems), problems
    assert any("._free_request" in p for p in problems), problems
    # A row the code does not use.
    unused = vs.Name("vllm.lora.model_manager", "LoRAModelManager.never_touched", "read", "?")
    assert rows_without_code((*vs.TABLE, unused), code) == [
        "vllm.lora.model_manager:LoRAModelManager.never_touched (read): not used by the code"]


def test_overrides_and_self_writes_seen_at_run_time():
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    class W(PunicaWrapperCPU):
        def add_shrink(self, *a, **kw):
            self.is_prefill = False
            self.mine = 1
            self._nora_x = 2

        def helper(self):
            pass

    assert [m for m, _ in overrides(W)] == ["add_shrink"]
    assert [a for a, _ in self_writes(W)] == ["is_prefill"]
    assert not code_without_rows(vs.TABLE, {}, [W])
    table = [r for r in vs.TABLE if r.path != "PunicaWrapperCPU.add_shrink"]
    assert code_without_rows(table, {}, [W]) == ["W.add_shrink overrides vLLM's: no override row"]


# -- the table ------------------------------------------------------------------------------------
def test_table_rows_are_well_formed():
    for row in vs.TABLE:
        assert row.kind in vs.KINDS, row
        assert row.why, row
        assert row.module.startswith("vllm"), row
        for since, module, path in row.moved:
            assert since in vs.SUPPORTED_VLLM and module.startswith("vllm") and path, row
    assert len({(r.module, r.path, r.kind) for r in vs.TABLE}) == len(vs.TABLE)


def test_table_checks_clean_against_the_installed_vllm():
    assert vs.check(gpu=True) == []
    assert vs.refusal() is None


def test_the_check_reports_a_rename_and_a_call_vllm_no_longer_makes():
    renamed = vs.Name("vllm.lora.model_manager", "LoRAModelManager.renamed_in_a_new_vllm", "wrap", "?")
    assert vs._check_installed(renamed, (0, 32), False).startswith(
        "vllm.lora.model_manager:LoRAModelManager.renamed_in_a_new_vllm (wrap): AttributeError")
    not_called = vs.Name("vllm.lora.layers.base_linear", "BaseLinearLayerWithLoRA._apply_lora_to_output",
                         "override", "?", used_by="BaseLinearLayerWithLoRA.create_lora_weights")
    assert "no longer names _apply_lora_to_output" in vs._check_installed(not_called, (0, 32), False)
    unset = vs.Name("vllm.lora.model_manager", "LoRAModelManager._never_set", "read", "?", instance=True)
    assert "no longer sets _never_set" in vs._check_installed(unset, (0, 32), False)
    tree = SourceTree(Path(__import__("vllm").__file__).parent.parent)
    assert vs._check_source(not_called, tree, (0, 32)).endswith("no longer names _apply_lora_to_output")
    assert "not found" in vs._check_source(renamed, tree, (0, 32))


def test_table_equals_what_the_code_touches():
    code = scans()
    problems = code_without_rows(vs.TABLE, code) + rows_without_code(vs.TABLE, code)
    assert not problems, "\n".join(problems)


def test_table_checks_clean_against_the_installed_source_tree():
    """The ast reading of a source tree agrees with the import check (the same vLLM)."""
    tree = SourceTree(Path(__import__("vllm").__file__).parent.parent)
    assert tree.version() == vs.version_of(__import__("vllm").__version__)
    assert vs.check(tree) == []


# -- vLLM 0.33 ------------------------------------------------------------------------------------
def _tree_033() -> SourceTree:
    if not (SRC_033 / "vllm" / "__init__.py").is_file():
        pytest.skip(f"vLLM 0.33's source is not unpacked at {SRC_033}; to get it: {GET_033}")
    return SourceTree(SRC_033)


def _signature(tree: SourceTree, row: vs.Name, version) -> str | None:
    module, path = row.static.split(":") if row.static else row.at(version)
    return tree.signature(module, path)


def test_table_checks_clean_against_vllm_033_source():
    tree = _tree_033()
    assert tree.version() == (0, 33)
    assert vs.check(tree) == []
    # Without the table's moves it would not be: they are needed, and seen.
    moved = [r for r in vs.TABLE if r.moved]
    assert moved
    for row in moved:
        assert vs._check_source(vs.Name(row.module, row.path, row.kind, row.why), tree, (0, 33)), row


def test_signatures_the_plugin_relies_on_are_unchanged_in_vllm_033():
    """What the plugin wraps, overrides, replaces or calls takes the same arguments in 0.33."""
    new = _tree_033()
    old = SourceTree(Path(__import__("vllm").__file__).parent.parent)
    changed = []
    for row in vs.TABLE:
        if row.kind in ("wrap", "override", "read", "replace") and (row.since or (0, 32)) <= (0, 32):
            before, after = _signature(old, row, (0, 32)), _signature(new, row, (0, 33))
            if before != after:
                changed.append(f"{row.module}:{row.path} {before} -> {after}")
    assert not changed, "\n".join(changed)
