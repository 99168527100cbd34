"""``nora-train``: train a LoRA-family adapter and save it in nora-serve's native format.

Every flag is generated from a field of :class:`nora_serve.train.TrainConfig` (its type, default
and metadata: help, flag names and aliases, group, choices), so the CLI and the Python API
cannot drift apart; a method's own settings (its ``options`` in the method registry) form one
argument group per method, so a new method's flags need no change here. Exit status: 0 success,
1 runtime error (one line on stderr), 2 usage error (a bad flag, or settings that contradict
each other).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import textwrap
import types
import typing

from nora_serve.cli import (EXIT_ERROR, EXIT_OK, add_version_flag, usage_error,
                            warnings_to_stderr)
from nora_serve.train import DataError, TrainConfig, train
from nora_serve.train.trainer import ADAPTER, OPTIM, RUNTIME

PROG = "nora-train"
# After the ungrouped (required) flags; then one group per method with settings of its own.
GROUP_ORDER = (ADAPTER, OPTIM, RUNTIME)

EPILOG = """\
data: JSONL, one object per line, either {"text": "..."} (loss on every token) or
{"prompt": "...", "completion": "..."} (loss on the completion only).

output: DIR/adapter_config.json and DIR/adapter_model.safetensors (native format;
dora: PEFT's own DoRA format, loadable by PeftModel.from_pretrained); nora, loraxs,
inttune: only the trained tensors, and the shared basis once in DIR/../bases/<digest>.safetensors
(computed once per base and settings, then found by recipe in the basis cache
$NORA_BASIS_CACHE, default ~/.cache/nora-serve/bases, or given with --basis),
DIR/train_log.json (loss per step) and DIR/loss.png (needs matplotlib: without it,
a warning and no plot; pip install 'nora-serve[train]').

methods:
"""


def _methods_help() -> str:
    """One entry per trainable registered method, from its own summary."""
    from nora_serve.methods import get_method
    from nora_serve.train import METHODS

    lines = []
    for name in METHODS:
        wrapped = textwrap.wrap(get_method(name).summary, 78 - 11) or [""]
        lines.append(f"  {name:<8} {wrapped[0]}")
        lines += [" " * 11 + w for w in wrapped[1:]]
    return "\n".join(lines) + "\n"


def _base_type(tp):
    """``int | None`` -> ``int``; other types unchanged."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [t for t in typing.get_args(tp) if t is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def flag_names(f: dataclasses.Field) -> tuple[str, ...]:
    return tuple(f.metadata.get("flags") or ("--" + f.name.replace("_", "-"),))


def add_config_arguments(p: argparse.ArgumentParser, cls=TrainConfig) -> None:
    """One flag per dataclass field of ``cls``, ``dest`` = the field name."""
    hints = typing.get_type_hints(cls)
    groups = {None: p}
    for name in GROUP_ORDER:
        groups[name] = p.add_argument_group(name)
    for f in dataclasses.fields(cls):
        md = f.metadata
        group = md.get("group") or (f"--method {md['method']}" if "method" in md else None)
        if group not in groups:
            doc = md.get("group_help")
            groups[group] = p.add_argument_group(group, textwrap.fill(doc, 76) if doc else None)
        g = groups[group]
        kw: dict = {"dest": f.name, "help": md.get("help", "")}
        tp = _base_type(hints[f.name])
        has_default = f.default is not dataclasses.MISSING
        if tp is bool:
            kw["action"] = "store_false" if md.get("negate") else "store_true"
            kw["default"] = f.default
        else:
            kw["type"] = md.get("parse") or tp
            for k in ("choices", "metavar"):
                if k in md:
                    kw[k] = md[k]
            if md.get("required"):
                kw["required"] = True
            if has_default:
                kw["default"] = f.default
                shown = md.get("default_help", f.default)
                if not md.get("required"):
                    kw["help"] += f" [{shown}]".replace("%", "%%")
        g.add_argument(*flag_names(f), **kw)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Train an adapter on a Hugging Face causal LM (CPU, or the GPU when there is one).",
        epilog=EPILOG + _methods_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_version_flag(p)
    add_config_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # bad flags: argparse's message, exit 2
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    try:
        cfg.validate()
    except ValueError as e:  # settings that contradict each other: a usage error
        return usage_error(parser, str(e))
    try:
        with warnings_to_stderr(PROG):
            res = train(cfg)
    # Runtime failures: one line, exit 1. OSError: a missing model or data path, an existing
    # --out; ValueError: e.g. targets the model lacks; RuntimeError / FloatingPointError: the
    # run itself (out of memory, a diverging loss).
    except (DataError, ValueError, OSError, RuntimeError, FloatingPointError) as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_ERROR
    log = res.log
    print(
        f"saved {cfg.method} adapter to {res.out}: {log['modules']} modules, "
        f"{log['trainable_params']:,} trainable parameters, loss {log['loss'][0]:.4f} -> {log['loss'][-1]:.4f}"
    )
    if res.basis is not None:
        print(res.basis.line())
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
