"""A vLLM source tree read with ``ast``, nothing imported: where a name of the plugin's vLLM
table (``vllm_surface.TABLE``) is defined in a vLLM that is not (or cannot be) installed, e.g.
an unpacked wheel of the next release, and the argument lists of its functions.

    python -m nora_serve.vllm_plugin.vllm_surface SRC   # SRC holds vllm/ (an unpacked wheel)
"""

from __future__ import annotations

import ast
import re
from functools import lru_cache
from pathlib import Path


class SourceTree:
    """``root``: the directory that holds the ``vllm`` package."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def version(self) -> tuple[int, int] | None:
        """``(major, minor)`` the tree declares (``vllm/_version.py``), ``None`` if it does not."""
        f = self.root / "vllm" / "_version.py"
        m = re.search(r"__version__\s*=\s*(?:version\s*=\s*)?['\"]([^'\"]+)", f.read_text()) if f.is_file() else None
        return version_of(m.group(1)) if m else None

    # -- modules ---------------------------------------------------------------------------
    def module_file(self, module: str) -> Path | None:
        base = self.root.joinpath(*module.split("."))
        for f in (base.with_suffix(".py"), base / "__init__.py"):
            if f.is_file():
                return f
        return None

    @lru_cache(maxsize=None)  # noqa: B019 - a tree per source root, kept for the process
    def _parsed(self, module: str) -> tuple[ast.Module, str] | None:
        f = self.module_file(module)
        if f is None:
            return None
        text = f.read_text()
        return ast.parse(text, str(f)), text

    def _package(self, module: str) -> str:
        f = self.module_file(module)
        return module if f is not None and f.name == "__init__.py" else module.rpartition(".")[0]

    # -- names -----------------------------------------------------------------------------
    def lookup(self, module: str, name: str, _seen: frozenset = frozenset()):
        """``(module, node)`` where ``module.name`` is defined (a ClassDef, FunctionDef, or the
        Assign / AnnAssign of a module-level value), following ``from X import name``; a
        submodule is ``(module.name, None)``. ``None``: not there."""
        if (module, name) in _seen:
            return None
        _seen = _seen | {(module, name)}
        parsed = self._parsed(module)
        if parsed is None:
            return None
        found = None
        for node in _top_level(parsed[0]):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
                found = (module, node)
            elif isinstance(node, ast.Assign) and any(
                    isinstance(t, ast.Name) and t.id == name for t in node.targets):
                found = found or (module, node)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
                found = found or (module, node)
            elif isinstance(node, ast.ImportFrom):
                for a in node.names:
                    if (a.asname or a.name) == name:
                        source = self._absolute(module, node)
                        hit = self.lookup(source, a.name, _seen) or (
                            (f"{source}.{a.name}", None) if self.module_file(f"{source}.{a.name}") else None)
                        found = found or hit
        if found is None and self.module_file(f"{module}.{name}"):
            return (f"{module}.{name}", None)
        if found is None and name in self.dynamic_names(module):
            return (module, None)  # a module ``__getattr__`` names it (vllm.envs, current_platform)
        return found

    def dynamic_names(self, module: str) -> set[str]:
        """String constants of a module-level ``__getattr__`` / ``environment_variables`` table:
        the names such a module makes at run time."""
        parsed = self._parsed(module)
        if parsed is None:
            return set()
        out = set()
        for node in _top_level(parsed[0]):
            if (isinstance(node, ast.FunctionDef) and node.name == "__getattr__") or (
                    isinstance(node, (ast.Assign, ast.AnnAssign)) and "environment_variables" in ast.unparse(
                        node.targets[0] if isinstance(node, ast.Assign) else node.target)):
                out |= {c.value for c in ast.walk(node) if isinstance(c, ast.Constant) and isinstance(c.value, str)}
        return out

    def _absolute(self, module: str, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = self._package(module).split(".")
        base = base[: len(base) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))

    def resolve(self, module: str, path: str, *, instance: bool = False):
        """``(module, node)`` of ``module:path`` (``Cls.attr`` found in the class or a base;
        ``instance``: the last part is an attribute its code sets, ``self.attr``), or a
        string saying what is missing."""
        parts = path.split(".")
        hit = self.lookup(module, parts[0])
        if hit is None:
            return f"{module}.{parts[0]} not found" if self.module_file(module) else f"module {module} not found"
        for i, part in enumerate(parts[1:], 1):
            mod, node = hit
            last = i == len(parts) - 1
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and isinstance(
                    node.value.func, ast.Name):  # a module-level instance: X = _X()
                made = self.lookup(mod, node.value.func.id)
                if made and isinstance(made[1], ast.ClassDef):
                    mod, node = made
            if node is None:  # a module
                hit = self.lookup(mod, part)
            elif isinstance(node, ast.ClassDef):
                hit = self.member(mod, node, part, instance=instance and last)
            else:
                return f"{'.'.join(parts[:i])} is not a class or module"
            if hit is None:
                return f"{module}:{'.'.join(parts[:i + 1])} not found"
        return hit

    def bases(self, module: str, cls: ast.ClassDef):
        """``(module, ClassDef)`` of each base class found in the tree (outside vLLM: skipped)."""
        for b in cls.bases:
            if isinstance(b, ast.Subscript):  # Generic[T], LRUCache[int, T]
                b = b.value
            hit = None
            if isinstance(b, ast.Name):
                hit = self.lookup(module, b.id)
            elif isinstance(b, ast.Attribute) and isinstance(b.value, ast.Name):
                owner = self.lookup(module, b.value.id)
                if owner and owner[1] is None:
                    hit = self.lookup(owner[0], b.attr)
            if hit and isinstance(hit[1], ast.ClassDef):
                yield hit

    def member(self, module: str, cls: ast.ClassDef, name: str, *, instance: bool = False, _depth: int = 0):
        """``(module, node)`` of ``name`` in the class body or a base's; ``instance``: also an
        attribute set as ``self.name`` in its methods (``(module, ClassDef)`` then)."""
        for node in cls.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
                return (module, node)
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
                return (module, node)
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
                return (module, node)
        if instance and re.search(rf"\bself\.{re.escape(name)}\s*(:|=(?!=))", self.source(module, cls)):
            return (module, cls)
        if _depth < 12:
            for mod, base in self.bases(module, cls):
                hit = self.member(mod, base, name, instance=instance, _depth=_depth + 1)
                if hit:
                    return hit
        return None

    def source(self, module: str, node: ast.AST) -> str:
        parsed = self._parsed(module)
        return ast.get_source_segment(parsed[1], node) or "" if parsed else ""

    def names(self, module: str, path: str, word: str) -> bool | str:
        """Whether the source of ``module:path`` (a function or class) names ``word``, or a
        string saying why it cannot be read."""
        hit = self.resolve(module, path)
        if isinstance(hit, str):
            return hit
        return re.search(rf"\b{re.escape(word)}\b", self.source(*hit)) is not None

    def signature(self, module: str, path: str) -> str | None:
        """A function's arguments (names, kinds and defaults, no annotations); ``None``: not a
        function."""
        hit = self.resolve(module, path)
        if isinstance(hit, str) or not isinstance(hit[1], (ast.FunctionDef, ast.AsyncFunctionDef)):
            return None
        args = hit[1].args
        out = []
        pos = args.posonlyargs + args.args
        defaults = [None] * (len(pos) - len(args.defaults)) + list(args.defaults)
        for a, d in zip(pos, defaults):
            out.append(a.arg + (f"={ast.unparse(d)}" if d is not None else ""))
        if args.vararg:
            out.append("*" + args.vararg.arg)
        elif args.kwonlyargs:
            out.append("*")
        for a, d in zip(args.kwonlyargs, args.kw_defaults):
            out.append(a.arg + (f"={ast.unparse(d)}" if d is not None else ""))
        if args.kwarg:
            out.append("**" + args.kwarg.arg)
        return f"({', '.join(out)})"


def version_of(text: str) -> tuple[int, int] | None:
    """``(major, minor)`` of a version string ("0.32.0", "0.33.1rc2+cpu"), ``None`` if unreadable."""
    parts = str(text).split(".")
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or "x")
    except (IndexError, ValueError):
        return None


def _top_level(tree: ast.Module):
    """Module-level statements, including those under ``if`` / ``try`` (TYPE_CHECKING aside)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop(0)
        if isinstance(node, ast.If):
            if "TYPE_CHECKING" not in ast.unparse(node.test):
                stack[:0] = node.body + node.orelse
        elif isinstance(node, ast.Try):
            stack[:0] = node.body + [s for h in node.handlers for s in h.body] + node.orelse
        else:
            yield node
