"""PEFT's weight-decomposed DoRA (``LoraConfig(use_dora=True)``, arXiv 2402.09353).

``y = v ⊙ (W x + s B A x) + bias`` with ``v = m / ||W + s B A||`` per output row (the norm over
the input dimension, treated as a constant: PEFT detaches it), ``A: [r, d_in]``,
``B: [d_out, r]``, ``m = lora_magnitude: [d_out]``, ``s = alpha / r`` (``alpha / sqrt(r)`` with
rsLoRA). Its change of the output is not a low-rank delta of ``W0``, so it is never folded into
LoRA; :func:`dora_serving_form` gives what a server needs instead: a LoRA plus a per-row scale
of the base output. Saved in PEFT's own format (``lora_magnitude_vector``), so stock PEFT loads
what ``nora-train --method dora`` writes. Init as PEFT: A kaiming-uniform, B = 0, m = ``||W0||``
per row.
"""

from __future__ import annotations

import torch

from .registry import InitArgs, Method, check_pairs, kaiming_, mm, register_method

PEFT_PREFIX = "base_model.model."
# Native short name -> PEFT's key suffix.
PEFT_KEYS = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_magnitude": "lora_magnitude_vector"}


def dora_row_scale(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, m: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """``v = m / ||W + s B A||`` per output row (``[d_out]``), in ``W``'s dtype, no gradient
    through the norm (as PEFT)."""
    with torch.no_grad():
        norm = torch.linalg.norm(W + scale * (B.to(W.dtype) @ A.to(W.dtype)), dim=1)
    return m.to(W.dtype) / norm


def dora_forward(t, s, x, W=None) -> torch.Tensor:
    """What DoRA adds to the base layer's output ``x Wᵀ + bias``: ``(v - 1) ⊙ x Wᵀ + v ⊙ s x Aᵀ Bᵀ``."""
    if W is None:
        raise ValueError("DoRA's forward needs the base weight W")
    W = W.to(x.dtype)
    v = dora_row_scale(W, t["lora_A"], t["lora_B"], t["lora_magnitude"].to(x.dtype), s)
    return (v - 1) * (x @ W.T) + v * (s * mm(x, t["lora_A"], t["lora_B"]))


def dora_serving_form(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, m: torch.Tensor,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A, B', v)`` with ``B' = s · diag(v) · B``, so that ``y = v ⊙ (W x) + B' A x + bias``
    (the bias unscaled): a LoRA plus a per-row scale of the base output, exact."""
    v = dora_row_scale(W, A, B, m, scale)
    return A, (scale * v[:, None] * B.to(v.dtype)), v


def _not_low_rank(t, s):
    raise ValueError("weight-decomposed DoRA (use_dora): its change of W is not low-rank, so it "
                     "has no factors; serve it as it is (nora-serve MODEL --enable-nora)")


def _check(t):
    A, B, m = t["lora_A"], t["lora_B"], t["lora_magnitude"]
    return check_pairs(t, ("lora_B", B.shape[1] == A.shape[0], f"lora_B {tuple(B.shape)} vs lora_A {tuple(A.shape)}"),
                       ("lora_magnitude", tuple(m.shape) == (B.shape[0],),
                        f"lora_magnitude_vector {tuple(m.shape)} vs d_out {B.shape[0]}"))


def _init(a: InitArgs) -> dict[str, torch.Tensor]:
    # m = ||W0 + s B A|| with B = 0: the base weight's row norms (PEFT's update_layer).
    m = torch.linalg.norm(a.W0.to(torch.float32), dim=1)
    return {"lora_A": kaiming_(torch.empty(a.r, a.d_in), a.gen), "lora_B": torch.zeros(a.d_out, a.r),
            "lora_magnitude": m}


def export_peft(config: dict, tensors: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(adapter_config.json, flat tensors)`` in PEFT's own DoRA layout."""
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "use_dora": True,
        "r": int(config["r"]), "lora_alpha": config["lora_alpha"],
        "use_rslora": bool(config.get("use_rslora")),
        "target_modules": sorted(tensors), "base_model_name_or_path": config.get("base_model_name_or_path"),
        "bias": "none", "fan_in_fan_out": False, "lora_dropout": 0.0, "init_lora_weights": True,
        "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None, "inference_mode": True,
    }
    # Only PEFT's own fields (stock PEFT warns on others); the base is named by its path.
    flat = {f"{PEFT_PREFIX}{mod}.{PEFT_KEYS[n]}": v for mod, ts in tensors.items() for n, v in ts.items()}
    return cfg, flat


DORA = register_method(Method(
    name="dora",
    summary="PEFT DoRA (use_dora): y = v (W x + s B A x), v = m/||W + s B A|| per row; "
            "s = alpha/r; saved in PEFT's format",
    tensors=("lora_A", "lora_B", "lora_magnitude"),
    factors=_not_low_rank,
    forward=dora_forward,
    check=_check,
    rank=lambda t: t["lora_A"].shape[0],
    shape=lambda t: (t["lora_B"].shape[0], t["lora_A"].shape[1]),
    vectors=("lora_magnitude",),
    rslora=True,
    trainable=("lora_A", "lora_B", "lora_magnitude"),
    init=_init,
    needs_w0=True,
    needs_weight=True,
    native=False,
    foldable=False,
    export=export_peft,
    serving_form=lambda t, s, W: dora_serving_form(W, t["lora_A"], t["lora_B"], t["lora_magnitude"], s),
))
