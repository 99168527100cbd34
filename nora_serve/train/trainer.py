"""The training loop: load a base, inject a method's layers, train with AdamW, save native.

Direct on purpose: one loop, no framework. The output directory (written all or nothing) holds
the native adapter (``adapter_config.json``, ``adapter_model.safetensors``) plus
``train_log.json`` (the loss curve as data) and ``loss.png``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from nora_serve.converters.atomic import atomic_dir
from nora_serve.converters.fingerprint import base_fingerprints, fingerprint_tensor, fingerprint_tensors
from nora_serve.converters.native import SHARED_TENSORS, NativeAdapter

from .data import Example, causal_lm_loss, collate, load_examples
from .dyrank import DyRankPruner
from .inject import (
    LLAMA_TARGETS,
    METHODS,
    NEEDS_W0,
    activation_scales,
    calibration_settings,
    find_targets,
    inject,
    model_dir,
    stored_weights,
)
from .layers import AdapterLinear

LOG_NAME = "train_log.json"
PLOT_NAME = "loss.png"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHARED_RULES = {"nora": "svd", "inttune": "nystrom"}


@dataclass
class TrainConfig:
    model: str
    data: str
    method: str
    out: str | None = None
    rank: int = 8
    inner_rank: int | None = None  # NoRA r'; default rank // 2
    alpha: float = 16.0
    targets: tuple[str, ...] = LLAMA_TARGETS
    lr: float = 2e-4
    max_steps: int | None = None
    epochs: float | None = None  # used when max_steps is not given (default 1)
    batch_size: int = 8
    max_length: int = 512
    seed: int = 0
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on GPU
    device: str = "auto"
    dropout: float = 0.0
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "linear"  # constant | linear | cosine (after warmup)
    grad_clip: float = 1.0
    use_rslora: bool = False
    calibration: int = 0  # NoRA: examples for the activation-aware SVD (0: plain SVD)
    dyrank_warmup_ratio: float = 0.15
    dyrank_final_ratio: float = 0.5
    dyrank_interval: int | None = None
    dyrank_beta: float = 0.9
    dyrank_reg: float = 0.1
    overwrite: bool = False
    progress: bool = True

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r} (known: {', '.join(METHODS)})")
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.method == "nora":
            r_in = self.inner_r
            if not 1 <= r_in < self.rank:
                raise ValueError(f"NoRA needs 1 <= inner_rank < rank, got inner_rank={r_in}, rank={self.rank}")
        elif self.inner_rank is not None:
            raise ValueError(f"inner_rank is a NoRA setting; method {self.method!r} takes none")
        if self.calibration and self.method != "nora":
            raise ValueError("calibration (activation-aware SVD) applies to NoRA only")
        if self.calibration < 0:
            raise ValueError("calibration must be >= 0 examples")
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

    @property
    def inner_r(self) -> int:
        return self.inner_rank if self.inner_rank is not None else max(1, self.rank // 2)


@dataclass
class TrainResult:
    model: torch.nn.Module  # the base with the trained adapter layers in it (eval mode)
    layers: dict[str, AdapterLinear]
    adapter: NativeAdapter
    log: dict
    out: Path | None
    tokenizer: object = field(repr=False, default=None)


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


def shared_basis(cfg: TrainConfig, layers: dict[str, AdapterLinear], calibration: dict | None) -> dict | None:
    if cfg.method not in SHARED_RULES:
        return None
    shared = {
        f"{n}.{t}": layer.native_tensors()[t].detach().cpu()
        for n, layer in layers.items()
        for t in SHARED_TENSORS[cfg.method]
    }
    return {
        "rule": SHARED_RULES[cfg.method],
        "r": cfg.rank,
        "calibration": calibration,
        "fingerprint": fingerprint_tensors(shared),
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

    act_scales, calib = None, None
    if cfg.calibration:
        # The first N usable examples in file order: a deterministic calibration batch.
        seqs = [e.input_ids for e in examples[: cfg.calibration]]
        act_scales = activation_scales(model, names, seqs, power=0.5)
        calib = calibration_settings(seqs, cfg.max_length, dtype, 0.5)

    layer_kw = dict(r=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout)
    if cfg.method == "nora":
        layer_kw["inner_r"] = cfg.inner_r
    if cfg.method == "lora":
        layer_kw["use_rslora"] = cfg.use_rslora
    weights = stored_weights(model, names, mdir) if cfg.method in NEEDS_W0 else None
    layers = inject(model, cfg.method, names, weights=weights, seed=cfg.seed, act_scales=act_scales, **layer_kw)
    info = {"base_fingerprints": fps, "calibration": calib}
    return model, tok, layers, examples, info


def native_adapter(cfg: TrainConfig, layers: dict[str, AdapterLinear], info: dict, rank_pattern=None) -> NativeAdapter:
    config = {
        "method": cfg.method,
        "r": next(iter(layers.values())).r,  # dyrank: the start rank r0
        "lora_alpha": cfg.alpha,
        "use_rslora": bool(cfg.use_rslora and cfg.method == "lora"),
        "base_model_name_or_path": cfg.model,
        "base_fingerprints": info["base_fingerprints"],
        "shared_basis": shared_basis(cfg, layers, info["calibration"]),
    }
    if cfg.method == "nora":
        config["inner_r"] = cfg.inner_r
    if cfg.method == "dyrank":
        config["rank_pattern"] = rank_pattern
        config["target_r"] = cfg.rank
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
    pruner = None
    if cfg.method == "dyrank":
        pruner = DyRankPruner(
            layers, total, cfg.rank, warmup_ratio=cfg.dyrank_warmup_ratio, final_ratio=cfg.dyrank_final_ratio,
            interval=cfg.dyrank_interval, beta=cfg.dyrank_beta,
        )
    frozen_before = {
        n: {k: t.detach().clone() for k, t in layer.native_tensors().items() if k in _frozen_names(layer)}
        for n, layer in layers.items()
    }

    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    log = {"method": cfg.method, "step": [], "loss": [], "lr": [], "step_time_s": []}
    model.train()
    bar = tqdm(total=total, desc=f"nora-train {cfg.method}", disable=not cfg.progress, dynamic_ncols=True)
    t_start = time.perf_counter()
    for step, batch in enumerate(batches(examples, cfg.batch_size, total, cfg.seed)):
        t0 = time.perf_counter()
        b = {k: v.to(device) for k, v in collate(batch, pad).items()}
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        loss = causal_lm_loss(logits, b["labels"])
        total_loss = loss
        if pruner is not None and cfg.dyrank_reg and pruner.reg_active(step):
            total_loss = loss + cfg.dyrank_reg * pruner.regularizer()
        if not torch.isfinite(total_loss):
            raise FloatingPointError(f"loss is {total_loss.item()} at step {step + 1}; lower --lr")
        total_loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        lr = sched.get_last_lr()[0]
        sched.step()
        if pruner is not None:
            pruner.after_step(step)
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
    if pruner is not None:
        pruner.finish()
    model.eval()

    for n, layer in layers.items():  # the frozen factors must not have moved
        now = layer.native_tensors()
        for k, t in frozen_before[n].items():
            if not torch.equal(now[k], t):
                raise RuntimeError(f"{n}.{k} is frozen but changed during training")

    rank_pattern = pruner.rank_pattern() if pruner is not None else None
    adapter = native_adapter(cfg, layers, info, rank_pattern)
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
    if pruner is not None:
        log["dyrank"] = {"r0": pruner.r0, "target_r": cfg.rank, "prune_history": pruner.history,
                         "rank_pattern": rank_pattern}
    out = None
    if cfg.out is not None:
        out = save(cfg.out, adapter, log, overwrite=cfg.overwrite)
    return TrainResult(model, layers, adapter, log, out, tok)


def _frozen_names(layer: AdapterLinear) -> set[str]:
    return {n for n, _ in layer.named_buffers(recurse=False) if n not in ("pruned", "score")}


def save(out: str | Path, adapter: NativeAdapter, log: dict, overwrite: bool = False) -> Path:
    """Adapter plus log and plot, all or nothing."""
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        adapter.save(tmp, overwrite=True)
        (tmp / LOG_NAME).write_text(json.dumps(log, indent=1) + "\n")
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
