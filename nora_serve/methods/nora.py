"""NoRA (nested LoRA): frozen SVD outer pair, trainable inner pair.

``ΔW = s · B_o (B_i A_i) A_o`` with ``B_o: [d_out, r]``, ``A_o: [r, d_in]``,
``B_i: [r, r']``, ``A_i: [r', r]``, ``s = alpha / r'``. The outer pair is the top-``r`` SVD of
``W0`` (``sqrt(S)`` on each side; activation-aware with a calibration batch), so all NoRA
adapters of one base and outer settings share it: a shared-basis method with core
``s B_i A_i``. Init: ``A_i`` kaiming-uniform, ``B_i = 0`` (the model starts at the base).

Training settings of its own (:class:`NoraOptions`): the inner rank ``r'`` (``--inner-rank``)
and the activation-aware SVD's calibration batch (``--calibration N``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch

from .base import Factors
from .registry import InitArgs, Method, check_pairs, kaiming_, max_rank_check, mm, register_method
from .training import BasisInputs, RunInputs, TrainOptions, option


def nora_factors(
    outer_A: torch.Tensor,
    outer_B: torch.Tensor,
    inner_A: torch.Tensor,
    inner_B: torch.Tensor,
    scale: float,
) -> Factors:
    """Fold the inner pair into the outer one: rank ``<= r'``."""
    return Factors(scale * (outer_B @ inner_B), inner_A @ outer_A)


# The top-r factors come from a randomized range finder (Halko, Martinsson, Tropp 2011):
# O(m n k) per power iteration instead of a full SVD's O(m n min(m, n)) (59 s -> ~1 s for a
# 4096 x 4096 weight on 2 cores). Oversampling and power iterations are fixed so the result is
# a deterministic function of (W0, r, act_scale) on one device; see tests/test_basis.py for
# its accuracy against the full SVD.
OVERSAMPLE = 10  # extra sketch columns: at least this many, and at least r
POWER_ITERS = 6  # subspace iterations: slow spectral decay (LLM weights) needs several
SKETCH_SEED = 0
EXACT_MAX_DIM = 512  # up to this min(d_out, d_in) a full SVD is cheap and exact


def basis_device() -> torch.device:
    """Where the top-r factors are computed: the GPU when there is one."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _randomized_svd(W: torch.Tensor, k: int, iters: int):
    """``(U, S, Vh)`` with ``k`` columns approximating the top-``k`` SVD of ``W`` (float64)."""
    gen = torch.Generator().manual_seed(SKETCH_SEED)  # the sketch is made on the CPU: same on every device
    G = torch.randn(W.shape[1], k, generator=gen, dtype=W.dtype).to(W.device)
    Q = torch.linalg.qr(W @ G).Q
    for _ in range(iters):  # re-orthonormalised each half step (stable in finite precision)
        Q = torch.linalg.qr(W.T @ Q).Q
        Q = torch.linalg.qr(W @ Q).Q
    Ub, S, Vh = torch.linalg.svd(Q.T @ W, full_matrices=False)
    return Q @ Ub, S, Vh


def top_svd(W0: torch.Tensor, r: int, act_scale: torch.Tensor | None = None, *,
            device: torch.device | str | None = None):
    """``(U_r, S_r, Vh_r)`` of ``W0 · diag(act_scale)`` in float64 (returned on the CPU), with a
    sign convention (the largest-magnitude entry of each left singular vector is positive), so
    the result is a deterministic function of its inputs on a given device. Small matrices get
    the full SVD; larger ones a randomized SVD (:data:`OVERSAMPLE`, :data:`POWER_ITERS`).
    Returns the float64 ``act_scale`` too (on the CPU)."""
    dev = torch.device(device) if device is not None else basis_device()
    W = W0.detach().to(device=dev, dtype=torch.float64)
    s = None
    if act_scale is not None:
        s = act_scale.detach().to(device="cpu", dtype=torch.float64)
        W = W * s.to(dev)[None, :]
    k = min(r + max(OVERSAMPLE, r), min(W.shape))
    if min(W.shape) <= max(EXACT_MAX_DIM, 2 * k):
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    else:
        U, S, Vh = _randomized_svd(W, k, POWER_ITERS)
    del W
    U, S, Vh = U[:, :r].cpu(), S[:r].cpu(), Vh[:r, :].cpu()
    idx = U.abs().argmax(dim=0)
    sign = torch.sign(U[idx, torch.arange(U.shape[1])])
    sign[sign == 0] = 1
    return U * sign[None, :], S, Vh * sign[:, None], s


def svd_outer(
    W0: torch.Tensor, r: int, act_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen outer pair ``(A_o, B_o)`` from the top-``r`` SVD of ``W0``.

    ``act_scale`` ([d_in], positive) makes it activation-aware: the SVD is taken of
    ``W0 · diag(act_scale)`` and the scale is divided back out of ``A_o``. Deterministic in
    (W0, r, act_scale) on one device (:func:`top_svd`); adapters share it through the basis
    file (``converters/basis_file.py``), not by recomputing it.
    """
    U, S, Vh, s = top_svd(W0, r, act_scale)
    root = S.sqrt()
    B_o = U * root[None, :]
    A_o = root[:, None] * Vh
    if s is not None:
        A_o = A_o / s[None, :]
    return A_o.to(W0.dtype).contiguous(), B_o.to(W0.dtype).contiguous()


def nora_core(inner_A: torch.Tensor, inner_B: torch.Tensor, scale: float) -> torch.Tensor:
    """The ``r x r`` core between the frozen outer pair: ``ΔW = B_o (s B_i A_i) A_o``."""
    return scale * (inner_B @ inner_A)


def _check(t):
    oA, oB, iA, iB = t["outer_A"], t["outer_B"], t["inner_A"], t["inner_B"]
    r = oA.shape[0]
    return check_pairs(
        t,
        ("outer_B", oB.shape[1] == r, f"outer_B {tuple(oB.shape)} vs outer_A {tuple(oA.shape)}"),
        ("inner_B", iB.shape[0] == r, f"inner_B {tuple(iB.shape)} vs outer rank {r}"),
        ("inner_A", tuple(iA.shape) == (iB.shape[1], r), f"inner_A {tuple(iA.shape)} vs inner_B {tuple(iB.shape)}"),
    )


def _basis(W0, r, act_scale=None):
    # Of the weight as stored, upcast exactly to float32 first (the SVD itself runs in float64).
    A_o, B_o = svd_outer(W0.to(torch.float32), r, act_scale)
    return {"outer_A": A_o, "outer_B": B_o}


def _init(a: InitArgs) -> dict[str, torch.Tensor]:
    max_rank_check("NoRA", a.r, a.d_out, a.d_in)
    r_in = int(a.config["inner_r"])
    if not 0 < r_in < a.r:
        raise ValueError(f"NoRA needs 0 < inner_rank < rank, got inner_rank={r_in}, rank={a.r}")
    t = dict(a.basis) if a.basis is not None else _basis(a.W0, a.r, a.act_scale)
    t["inner_A"] = kaiming_(torch.empty(r_in, a.r), a.gen)
    t["inner_B"] = torch.zeros(a.r, r_in)
    return t


CALIBRATION_POWER = 0.5  # the activation scale is mean(|x|) ** power per input channel


def calibration_settings(batches: list[list[int]], max_length: int, dtype: torch.dtype, power: float) -> dict:
    """What the activation-aware outer pair depends on, recorded in ``shared_basis``."""
    digest = hashlib.sha256(json.dumps(batches).encode()).hexdigest()[:32]
    return {
        "stat": "mean_abs",
        "power": power,
        "examples": len(batches),
        "max_length": max_length,
        "dtype": str(dtype).removeprefix("torch."),
        "tokens_sha256": digest,
    }


@dataclass(frozen=True)
class NoraOptions(TrainOptions):
    """NoRA's inner rank and the activation-aware SVD of its shared basis."""

    inner_rank: int | None = option(None, "inner rank r' < rank", default_help="rank // 2",
                                    exclusive=True)
    calibration: int = option(0, "activation-aware SVD from the first N training examples "
                                 "(0: plain SVD of W0)", metavar="N", exclusive=True)

    def inner_r(self, rank: int) -> int:
        return self.inner_rank if self.inner_rank is not None else max(1, rank // 2)

    def validate(self, rank: int) -> None:
        r_in = self.inner_r(rank)
        if not 1 <= r_in < rank:
            raise ValueError(f"NoRA needs 1 <= inner_rank < rank, got inner_rank={r_in}, rank={rank}")
        if self.calibration < 0:
            raise ValueError("calibration must be >= 0 examples")

    def config(self, rank: int) -> dict:
        return {"inner_r": self.inner_r(rank)}

    def prepare(self, run: RunInputs) -> BasisInputs | None:
        if not self.calibration:
            return None
        # The first N usable examples in file order: a deterministic calibration batch. The
        # scales take a forward pass: only when the basis is computed from them.
        seqs = [e.input_ids for e in run.examples[: self.calibration]]
        return BasisInputs(calibration_settings(seqs, run.max_length, run.dtype, CALIBRATION_POWER),
                           lambda: run.activation_scales(seqs, CALIBRATION_POWER))


NORA = register_method(Method(
    name="nora",
    summary="dW = s B_o (B_i A_i) A_o: outer pair from the SVD of W0 (frozen, shared), "
            "inner pair [r x r'] trained; s = alpha/r'",
    tensors=("outer_A", "outer_B", "inner_A", "inner_B"),
    factors=lambda t, s: nora_factors(t["outer_A"], t["outer_B"], t["inner_A"], t["inner_B"], s),
    forward=lambda t, s, x, W=None: s * mm(x, t["outer_A"], t["inner_A"], t["inner_B"], t["outer_B"]),
    check=_check,
    rank=lambda t: t["inner_A"].shape[0],
    shape=lambda t: (t["outer_B"].shape[0], t["outer_A"].shape[1]),
    scale=lambda c: float(c["lora_alpha"]) / int(c["inner_r"]),
    config_keys=("inner_r",),
    shared=("outer_A", "outer_B"),
    shared_rule="svd",
    basis=_basis,
    core=lambda t, s: nora_core(t["inner_A"], t["inner_B"], s),
    trainable=("inner_A", "inner_B"),
    init=_init,
    needs_w0=True,
    options=NoraOptions,
))
