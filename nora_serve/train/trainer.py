"""The training loop: load a base, inject a method's layers, train with AdamW, save native (a
method with its own format, PEFT's DoRA, saves in that).

Direct on purpose: one loop, no framework. The output directory (written all or nothing) holds
the native adapter (``adapter_config.json``, ``adapter_model.safetensors``) plus
``train_log.json`` (the loss curve as data) and ``loss.png`` (only with matplotlib, the
``train`` extra: without it a ``NoraWarning`` at the start, and everything else is saved).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
import typing
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from nora_serve.converters.atomic import atomic_dir
from nora_serve.converters.errors import NoraWarning
from nora_serve.converters.fingerprint import base_fingerprints, fingerprint_tensor, fingerprint_tensors
from nora_serve.converters.basis_file import BASES_DIR
from nora_serve.converters.native import FORMAT_VERSION_CORES, NativeAdapter
from nora_serve.methods import get_method, method_names
from nora_serve.methods.training import BasisInputs, RunInputs, TrainOptions, option

from .basis import RunBasis, run_basis
from .data import Example, causal_lm_loss, collate, load_examples
from .inject import (
    LLAMA_TARGETS,
    METHODS,
    activation_scales,
    find_targets,
    inject,
    model_dir,
    stored_weights,
)
from .layers import AdapterLinear

LOG_NAME = "train_log.json"
PLOT_NAME = "loss.png"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# A common field: ``option``'s metadata plus ``group`` (its ``nora-train --help`` section) and
# ``required`` (on the command line).
_opt = option


def _req(help: str, **cli):
    return field(metadata={"help": help, "required": True, **cli})


def _split_targets(s: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in s.split(",") if t.strip())


DTYPE_CHOICES = ("auto", *DTYPES)
ADAPTER, OPTIM, RUNTIME = "adapter", "optimisation", "runtime"
SHARED_BASIS_METHODS = ", ".join(method_names(shared_basis=True))


@dataclass
class _CommonConfig:
    """The settings every method takes."""

    model: str = _req("base model: a local directory or a cached Hub name",
                      flags=("--base", "--model"), metavar="MODEL")
    data: str = _req("training data, JSONL (see below)", metavar="JSONL")
    method: str = _req("adapter method (see below)", choices=METHODS)
    out: str | None = _opt(None, "output directory (written all or nothing)", required=True,
                           metavar="DIR")
    rank: int = _opt(8, "rank r (NoRA, LoRA-XS: the outer rank; dyrank: the target average rank)",
                     group=ADAPTER)
    alpha: float = _opt(16.0, "scale numerator alpha (see the scale per method)", group=ADAPTER,
                        flags=("--lora-alpha", "--alpha"), metavar="ALPHA")
    targets: tuple[str, ...] = _opt(
        LLAMA_TARGETS, "comma-separated module-name suffixes of the nn.Linear layers to adapt",
        group=ADAPTER, parse=_split_targets, default_help=",".join(LLAMA_TARGETS))
    lr: float = _opt(2e-4, "AdamW learning rate", group=OPTIM)
    max_steps: int | None = _opt(None, "optimizer steps (overrides --epochs)", group=OPTIM,
                                 default_help="from --epochs")
    epochs: float | None = _opt(None, "passes over the data when --max-steps is unset", group=OPTIM,
                                default_help="1")
    batch_size: int = _opt(8, "sequences per step", group=OPTIM)
    max_length: int = _opt(512, "truncate sequences to this many tokens", group=OPTIM)
    seed: int = _opt(0, "seed for the init and the data order", group=OPTIM)
    dtype: str = _opt("auto", "base model dtype; adapter weights stay float32", group=RUNTIME,
                      choices=DTYPE_CHOICES, default_help="auto: float32 on CPU, bfloat16 on GPU")
    device: str = _opt("auto", "cpu, cuda, cuda:1, ...", group=RUNTIME,
                       default_help="auto: cuda when available")
    dropout: float = _opt(0.0, "dropout on the adapter input", group=ADAPTER)
    weight_decay: float = _opt(0.0, "AdamW weight decay", group=OPTIM)
    warmup_steps: int = _opt(0, "linear learning-rate warmup steps", group=OPTIM)
    schedule: str = _opt("linear", "learning-rate decay after warmup", group=OPTIM,
                         choices=("constant", "linear", "cosine"))
    grad_clip: float = _opt(1.0, "max gradient norm, 0 to disable", group=OPTIM)
    use_rslora: bool = _opt(False, ", ".join(n for n in METHODS if get_method(n).rslora)
                            + ": scale alpha/sqrt(r)", group=ADAPTER,
                            flags=("--rslora", "--use-rslora"))
    basis: str | None = _opt(None, f"{SHARED_BASIS_METHODS}: train against this shared-basis file "
                                   "(checked against the base) instead of one found by recipe or "
                                   "computed", group=ADAPTER, metavar="FILE",
                             default_help="found or computed")
    overwrite: bool = _opt(False, "replace --out if it exists")
    progress: bool = _opt(True, "no progress bar (it shows only when stderr is a terminal)",
                          group=RUNTIME, flags=("--quiet", "--no-progress"), negate=True)

    def options(self) -> TrainOptions:
        """This run's method's own settings, from the fields it declares."""
        cls = get_method(self.method).options
        return cls(**{f.name: getattr(self, f.name) for f in fields(cls)})

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r} (known: {', '.join(METHODS)})")
        spec = get_method(self.method)
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        for f in fields(self):  # another method's setting that must not be set on this one
            owner = f.metadata.get("method")
            if (owner not in (None, self.method) and f.metadata.get("exclusive")
                    and getattr(self, f.name) != f.default):
                raise ValueError(f"{f.name} is a setting of method {owner}; method {self.method!r} "
                                 "takes none")
        self.options().validate(self.rank)
        if self.basis is not None and not spec.shared_basis:
            raise ValueError(f"basis (a shared-basis file) applies to {SHARED_BASIS_METHODS} only")
        for k in ("batch_size", "max_length"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1")
        if self.max_length < 2:
            raise ValueError("max_length must be >= 2 (a token and its successor)")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("max_steps must be >= 1")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError("epochs must be > 0")
        if self.schedule not in ("constant", "linear", "cosine"):
            raise ValueError(f"unknown schedule {self.schedule!r} (constant, linear, cosine)")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r} (auto, {', '.join(DTYPES)})")
        if not 0 <= self.dropout < 1:
            raise ValueError("dropout must be in [0, 1)")


def _method_fields() -> list[tuple[str, object, dataclasses.Field]]:
    """Each registered method's own settings (its ``options`` dataclass) as config fields, in
    registration order, marked with the method (``nora-train`` groups their flags by it)."""
    out, owner = [], {f.name: "nora-train" for f in fields(_CommonConfig)}
    for name in method_names():
        cls = get_method(name).options
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            if f.name in owner:
                raise ValueError(f"method {name}: setting {f.name!r} is already one of {owner[f.name]}'s")
            owner[f.name] = name
            md = {**f.metadata, "method": name, "group_help": (cls.__doc__ or "").strip()}
            out.append((f.name, hints[f.name], field(default=f.default, metadata=md)))
    return out


TrainConfig = dataclasses.make_dataclass("TrainConfig", _method_fields(), bases=(_CommonConfig,))
TrainConfig.__module__ = __name__
TrainConfig.__doc__ = """Everything ``train`` takes: the common settings and every method's own (its
``options`` dataclass, :mod:`nora_serve.methods.training`). Each field is also a ``nora-train``
flag (``--field-name`` unless its metadata names others), generated from the fields and their
metadata."""


@dataclass
class TrainResult:
    model: torch.nn.Module  # the base with the trained adapter layers in it (eval mode)
    layers: dict[str, AdapterLinear]
    adapter: NativeAdapter
    log: dict
    out: Path | None
    tokenizer: object = field(repr=False, default=None)
    basis: RunBasis | None = None  # shared-basis methods: the basis it trained against


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return DTYPES[dtype]


def lr_lambda(cfg: TrainConfig, total: int):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        frac = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        if cfg.schedule == "linear":
            return max(0.0, 1.0 - frac)
        return 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))

    return f


def batches(examples: list[Example], batch_size: int, total_steps: int, seed: int):
    """``total_steps`` batches, reshuffled (seeded) each pass over the data."""
    gen = torch.Generator().manual_seed(seed)
    step = 0
    while True:
        perm = torch.randperm(len(examples), generator=gen).tolist()
        for i in range(0, len(perm), batch_size):
            if step == total_steps:
                return
            yield [examples[j] for j in perm[i : i + batch_size]]
            step += 1


def shared_basis(cfg: TrainConfig, layers: dict[str, AdapterLinear], basis: RunBasis | None) -> dict | None:
    """The config's ``shared_basis``: rule, rank, the calibration it was made with, a sampled
    fingerprint, and the digest of its file (``NativeAdapter.save`` checks it)."""
    spec = get_method(cfg.method)
    if not spec.shared_basis:
        return None
    shared = {
        f"{n}.{t}": layer.native_tensors()[t].detach().cpu()
        for n, layer in layers.items()
        for t in spec.shared
    }
    return {
        "rule": spec.shared_rule,
        "r": cfg.rank,
        "calibration": basis.calibration if basis is not None else None,
        "fingerprint": fingerprint_tensors(shared),
        "digest": basis.digest if basis is not None else None,
    }


def prepare(cfg: TrainConfig, examples: list[Example] | None = None):
    """Load the base and tokenizer, read the data, inject the adapter layers (on the CPU).

    Returns ``(model, tokenizer, layers, examples, info)``; ``info`` carries what the saved
    config records about the base and the shared basis."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg.validate()
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    tok = AutoTokenizer.from_pretrained(cfg.model)
    if examples is None:
        examples = load_examples(cfg.data, tok, cfg.max_length)
    with _hf_progress_bars(cfg.progress):
        model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype)
    model.to("cpu")
    names = find_targets(model, cfg.targets)
    mdir = model_dir(cfg.model)

    try:
        fps = base_fingerprints(mdir, names) if mdir is not None else None
    except (KeyError, FileNotFoundError):
        fps = None
    if fps is None:  # no safetensors with these names: fingerprint the loaded weights
        fps = {n: fingerprint_tensor(model.get_submodule(n).weight) for n in names}

    opts = cfg.options()
    # The method's own preparation (NoRA: its calibration batch for an activation-aware basis).
    prep = opts.prepare(RunInputs(examples, cfg.max_length, dtype,
                                  lambda seqs, power: activation_scales(model, names, seqs, power=power))
                        ) or BasisInputs()
    spec = get_method(cfg.method)
    basis = None
    if spec.shared_basis:
        basis = run_basis(spec, r=cfg.rank, names=names, fps=fps,
                          calibration=prep.calibration, weights=lambda: stored_weights(model, names, mdir),
                          act_scales=prep.act_scales,
                          explicit=cfg.basis, store=store_dir(cfg.out), base_name=cfg.model,
                          progress=cfg.progress)
    layer_kw = dict(r=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, use_rslora=cfg.use_rslora,
                    config=opts.config(cfg.rank))
    weights = stored_weights(model, names, mdir) if spec.needs_w0 else None
    layers = inject(model, cfg.method, names, weights=weights, seed=cfg.seed,
                    basis=basis.tensors if basis is not None else None, **layer_kw)
    info = {"base_fingerprints": fps, "calibration": prep.calibration, "basis": basis}
    return model, tok, layers, examples, info


def store_dir(out: str | None) -> Path | None:
    """The ``bases/`` folder of the adapter store ``out`` is written into."""
    return Path(out).absolute().parent / BASES_DIR if out is not None else None


@contextlib.contextmanager
def _hf_progress_bars(progress: bool):
    """transformers' own bars (``Loading weights``) follow ours: off with ``progress=False`` or
    when stderr is not a terminal (no ``\r`` lines in logs); restored afterwards."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    off = was and not (progress and _stderr_is_tty())
    if off:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if off:
            hf_logging.enable_progress_bar()


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def native_adapter(cfg: TrainConfig, layers: dict[str, AdapterLinear], info: dict,
                   saved: dict | None = None) -> NativeAdapter:
    """The trained adapter; ``saved``: what the method's procedure records (``finish()``)."""
    spec = get_method(cfg.method)
    config = {
        "method": cfg.method,
        "r": next(iter(layers.values())).r,  # dyrank: the start rank r0
        "lora_alpha": cfg.alpha,
        "use_rslora": bool(cfg.use_rslora and spec.rslora),
        "base_model_name_or_path": cfg.model,
        "base_fingerprints": info["base_fingerprints"],
        "shared_basis": shared_basis(cfg, layers, info.get("basis")),
    }
    if spec.shared_basis:  # the basis in its own file, named by digest
        config["format_version"] = FORMAT_VERSION_CORES
    config.update(cfg.options().config(cfg.rank), **(saved or {}))  # the method's own keys
    tensors = {
        n: {k: t.detach().to("cpu", torch.float32).contiguous() for k, t in layer.native_tensors().items()}
        for n, layer in layers.items()
    }
    return NativeAdapter(config, tensors)


def count_trainable(layers: dict[str, AdapterLinear]) -> int:
    return sum(p.numel() for layer in layers.values() for p in layer.parameters() if p.requires_grad)


def train(cfg: TrainConfig, examples: list[Example] | None = None) -> TrainResult:
    """Train ``cfg.method`` on ``cfg.data`` (or on pre-encoded ``examples``) and, when
    ``cfg.out`` is set, save the native adapter and the training log there."""
    from tqdm.auto import tqdm

    cfg.validate()
    if cfg.out is not None and Path(cfg.out).exists() and not cfg.overwrite:
        # Fail before training, not after.
        raise FileExistsError(f"{cfg.out}: already exists (use --overwrite to replace it)")
    # The plot is optional: without matplotlib say so now, train, and save all but loss.png.
    plot = cfg.out is not None and have_matplotlib(warn=True)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    model, tok, layers, examples, info = prepare(cfg, examples)
    model.to(device)
    model.config.use_cache = False

    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total = cfg.max_steps or max(1, math.ceil((cfg.epochs or 1) * steps_per_epoch))
    params = [p for layer in layers.values() for p in layer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total))
    proc = cfg.options().procedure(layers, total, cfg.rank)  # the method's own step, if any
    frozen_before = {
        n: {k: t.detach().clone() for k, t in layer.native_tensors().items() if k in _frozen_names(layer)}
        for n, layer in layers.items()
    }

    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    log = {"method": cfg.method, "step": [], "loss": [], "lr": [], "step_time_s": []}
    model.train()
    # disable=None: no bar (no "\r" lines in logs) when stderr is not a terminal.
    bar = tqdm(total=total, desc=f"nora-train {cfg.method}", disable=None if cfg.progress else True,
               dynamic_ncols=True)
    t_start = time.perf_counter()
    for step, batch in enumerate(batches(examples, cfg.batch_size, total, cfg.seed)):
        t0 = time.perf_counter()
        b = {k: v.to(device) for k, v in collate(batch, pad).items()}
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        loss = causal_lm_loss(logits, b["labels"])
        extra = proc.loss(step) if proc is not None else None
        total_loss = loss if extra is None else loss + extra
        if not torch.isfinite(total_loss):
            raise FloatingPointError(f"loss is {total_loss.item()} at step {step + 1}; lower --lr")
        total_loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        lr = sched.get_last_lr()[0]
        sched.step()
        if proc is not None:
            proc.on_step(step)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        log["step"].append(step + 1)
        log["loss"].append(float(loss.detach()))
        log["lr"].append(lr)
        log["step_time_s"].append(dt)
        bar.update(1)
        bar.set_postfix(loss=f"{log['loss'][-1]:.4f}")
    bar.close()
    saved = proc.finish() if proc is not None else {}
    model.eval()

    for n, layer in layers.items():  # the frozen factors must not have moved
        now = layer.native_tensors()
        for k, t in frozen_before[n].items():
            if not torch.equal(now[k], t):
                raise RuntimeError(f"{n}.{k} is frozen but changed during training")

    adapter = native_adapter(cfg, layers, info, saved)
    log.update(
        trainable_params=count_trainable(layers),
        modules=len(layers),
        examples=len(examples),
        total_steps=total,
        train_time_s=time.perf_counter() - t_start,
        device=str(device),
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        config={k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
    )
    if info.get("basis") is not None:
        log["basis"] = info["basis"].log()
    if proc is not None:
        log.update(proc.log())
    out = None
    if cfg.out is not None:
        out = save(cfg.out, adapter, log, overwrite=cfg.overwrite, plot=plot)
    return TrainResult(model, layers, adapter, log, out, tok, info.get("basis"))


def _frozen_names(layer: AdapterLinear) -> set[str]:
    return set(getattr(layer, "frozen", ()))


MISSING_PLOT = (f"matplotlib is not installed, so {PLOT_NAME} will not be written (the loss is in "
                f"{LOG_NAME}); for the plot: pip install 'nora-serve[train]'")


def have_matplotlib(warn: bool = False) -> bool:
    """Whether ``loss.png`` can be drawn; with ``warn``, a ``NoraWarning`` when it cannot."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        if warn:
            warnings.warn(MISSING_PLOT, NoraWarning, stacklevel=3)
        return False
    return True


def save(out: str | Path, adapter: NativeAdapter, log: dict, overwrite: bool = False,
         plot: bool = True) -> Path:
    """Adapter plus log and (with ``plot`` and matplotlib) the loss plot, all or nothing."""
    out = Path(out)
    plot = plot and have_matplotlib(warn=True)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        # A shared basis goes into the store's bases/ (written before the adapter appears).
        adapter.save(tmp, overwrite=True, bases_dir=store_dir(str(out)))
        (tmp / LOG_NAME).write_text(json.dumps(log, indent=1) + "\n")
        if plot:
            plot_loss(log, tmp / PLOT_NAME)
    return out


def plot_loss(log: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(log["step"], log["loss"], lw=1, label="loss")
    if len(log["loss"]) >= 10:  # a moving average makes the trend readable
        k = max(2, len(log["loss"]) // 20)
        ma = [sum(log["loss"][max(0, i - k + 1) : i + 1]) / len(log["loss"][max(0, i - k + 1) : i + 1])
              for i in range(len(log["loss"]))]
        ax.plot(log["step"], ma, lw=2, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.set_title(f"{log['method']}: {log.get('trainable_params', '?')} trainable parameters")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
