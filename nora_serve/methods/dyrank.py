"""Dynamic-rank DoRA (arXiv 2405.17357): single-rank components, pruned per module.

``ΔW = s · B diag(c) A`` with ``A: [r0, d_in]``, ``c: [r0]``, ``B: [d_out, r0]``,
``s = lora_alpha / r0`` (fixed to the start rank ``r0 = ceil(1.5 r)`` even after pruning).
Init as the official code: ``c = 0``, A and B kaiming-uniform (gain for a = 0).

Its training procedure is its own (:class:`DyRankOptions`, the ``--dyrank-*`` flags, and
:class:`DyRankPruner`, the global pruning schedule of the official code): the trainer runs it
through the generic hooks of :mod:`.training`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import Factors
from .registry import InitArgs, Method, check_pairs, kaiming_, mm, register_method
from .training import Procedure, TrainOptions, option


def dyrank_factors(
    A: torch.Tensor,
    c: torch.Tensor,
    B: torch.Tensor,
    scale: float,
    pruned: torch.Tensor | None = None,
) -> Factors:
    """Keep the components with ``c_k != 0`` that are not pruned (``pruned[k]`` True)."""
    keep = c != 0
    if pruned is not None:
        keep = keep & ~pruned.to(torch.bool)
    idx = keep.nonzero().flatten()
    return Factors(scale * B[:, idx] * c[idx][None, :], A[idx, :])


def dyrank_importance(
    A: torch.Tensor, c: torch.Tensor, B: torch.Tensor, eps: float = 1e-8
) -> torch.Tensor:
    """Per-component importance ``|c_k| ||b_k|| ||a_k|| / ||ΔW||_F`` (``[r0]``).

    ``|c_k| ||b_k|| ||a_k||`` is the Frobenius norm of the rank-1 term ``c_k b_k a_kᵀ``; the
    scale ``s`` cancels in the ratio. ``eps`` keeps it finite while ``ΔW = 0`` (c starts at 0).
    """
    A, c, B = A.detach().float(), c.detach().float(), B.detach().float()
    delta = B @ (c[:, None] * A)
    return c.abs() * B.norm(dim=0) * A.norm(dim=1) / (delta.norm() + eps)


def dyrank_budget(total: int, r0: int, r_target: int, progress: float) -> int:
    """Components kept across all modules on the cubic schedule: ``progress`` in [0, 1] runs
    from the start of pruning (keep all ``total``) to its end (keep ``total · r_target / r0``)."""
    progress = min(max(progress, 0.0), 1.0)
    pruned = int(total * (r0 - r_target) * progress**3 / r0 + 1e-9)
    return total - pruned


def dyrank_variance_reg(As: list[torch.Tensor], Bs: list[torch.Tensor]) -> torch.Tensor:
    """The dimensional-equilibrium regulariser of the official code: the variance of each
    component's entries (``a_k`` over ``d_in``, ``b_k`` over ``d_out``), summed and averaged
    over ``2 · r0 · modules``. Low variance spreads a component's norm over its entries, so
    its importance is not carried by a few large weights."""
    total = sum(A.var(dim=1).sum() + B.var(dim=0).sum() for A, B in zip(As, Bs))
    return total / (2 * sum(A.shape[0] for A in As))


def dyrank_start_rank(r_target: int) -> int:
    return math.ceil(1.5 * r_target)


def _check(t):
    A, c, B = t["lora_A"], t["lora_c"], t["lora_B"]
    r = A.shape[0]
    return check_pairs(t, ("lora_B", B.shape[1] == r, f"lora_B {tuple(B.shape)} vs lora_A {tuple(A.shape)}"),
                       ("lora_c", tuple(c.shape) == (r,), f"lora_c {tuple(c.shape)} vs rank {r}"))


def _init(a: InitArgs) -> dict[str, torch.Tensor]:
    r0 = a.r  # the trainer passes the start rank (``start_rank``)
    return {"lora_A": kaiming_(torch.empty(r0, a.d_in), a.gen, a=0.0),
            "lora_c": torch.zeros(r0),
            "lora_B": kaiming_(torch.empty(a.d_out, r0), a.gen, a=0.0)}


class DyRankPruner(Procedure):
    """The global pruning schedule (arXiv 2405.17357, as its official code runs it).

    Steps ``[0, start)``: warm up (importance EMA only). Steps ``[start, end]``: every
    ``interval`` steps (and at ``end``) keep the globally most important components, the kept
    budget falling cubically from ``total`` to ``modules · r_target``; ``c_k`` of the others is
    zeroed (they may regrow until the next pruning, as in the official code). After ``end``: the
    final mask is fixed and re-applied every step, and the variance regulariser is off.

    ``layers``: ``{module: layer}``, each layer holding ``lora_A``, ``lora_c``, ``lora_B`` as
    attributes and its start rank as ``.r``. The mask (True = pruned) and the importance EMA
    are kept here, per module.
    """

    def __init__(self, layers, total_steps: int, r_target: int, *, warmup_ratio: float = 0.15,
                 final_ratio: float = 0.5, interval: int | None = None, beta: float = 0.9,
                 reg: float = 0.0, eps: float = 1e-8):
        _check_ratios(warmup_ratio, final_ratio)
        self.layers = dict(sorted(layers.items()))
        self.r0 = next(iter(self.layers.values())).r
        if not 0 < r_target <= self.r0:
            raise ValueError(f"dyrank: target rank {r_target} must be in 1..{self.r0}")
        self.r_target = r_target
        self.start = int(total_steps * warmup_ratio)
        self.end = max(self.start, total_steps - 1 - int(total_steps * final_ratio))
        span = self.end - self.start
        self.interval = interval or max(1, span // 10)
        self.beta, self.eps, self.reg = beta, eps, reg
        self.final = False
        self.history: list[tuple[int, int]] = []  # (step, kept components)
        self.pruned = {n: torch.zeros(m.r, dtype=torch.bool, device=m.lora_c.device)
                       for n, m in self.layers.items()}
        self.score = {n: torch.zeros(m.r, device=m.lora_c.device) for n, m in self.layers.items()}

    @property
    def total(self) -> int:
        return sum(layer.r for layer in self.layers.values())

    def reg_active(self, step: int) -> bool:
        return step <= self.end and not self.final

    def regularizer(self) -> torch.Tensor:
        return dyrank_variance_reg(
            [m.lora_A for m in self.layers.values()], [m.lora_B for m in self.layers.values()]
        )

    def loss(self, step: int) -> torch.Tensor | None:
        return self.reg * self.regularizer() if self.reg and self.reg_active(step) else None

    @torch.no_grad()
    def _apply_mask(self) -> None:
        for n, m in self.layers.items():
            m.lora_c[self.pruned[n]] = 0

    @torch.no_grad()
    def prune(self, progress: float) -> int:
        """Keep the top components by EMA importance, across all modules; returns how many."""
        budget = dyrank_budget(self.total, self.r0, self.r_target, progress)
        scores = torch.cat([s.float().cpu() for s in self.score.values()])
        # Stable sort: ties broken by module order, then component index (reproducible).
        order = torch.sort(scores, descending=True, stable=True).indices
        keep = torch.zeros_like(scores, dtype=torch.bool)
        keep[order[:budget]] = True
        off = 0
        for n, m in self.layers.items():
            self.pruned[n].copy_(~keep[off : off + m.r].to(self.pruned[n].device))
            off += m.r
        self._apply_mask()
        return budget

    @torch.no_grad()
    def update_scores(self) -> None:
        """One step of the importance EMA of every component."""
        for n, m in self.layers.items():
            s = dyrank_importance(m.lora_A, m.lora_c, m.lora_B, self.eps)
            self.score[n].mul_(self.beta).add_((1 - self.beta) * s.to(self.score[n].device))

    @torch.no_grad()
    def on_step(self, step: int) -> None:
        """Call after optimizer step ``step`` (0-based)."""
        if self.final or step > self.end:
            self._fix()
            return
        self.update_scores()
        p = step - self.start
        if p < 0:
            return
        span = self.end - self.start
        if p % self.interval == 0 or step == self.end:
            kept = self.prune(p / span if span > 0 else 1.0)
            self.history.append((step, kept))
            if step == self.end:
                self.final = True

    @torch.no_grad()
    def _fix(self) -> None:
        """Reach the final budget (even if training stopped early) and fix the mask."""
        if not self.final:
            self.history.append((-1, self.prune(1.0)))
            self.final = True
        self._apply_mask()

    def rank_pattern(self) -> dict[str, int]:
        return {n: int((m.lora_c.detach() != 0).sum()) for n, m in self.layers.items()}

    def finish(self) -> dict:
        self._fix()
        return {"rank_pattern": self.rank_pattern(), "target_r": self.r_target}

    def log(self) -> dict:
        return {"dyrank": {"r0": self.r0, "target_r": self.r_target, "prune_history": self.history,
                           "rank_pattern": self.rank_pattern()}}


def _check_ratios(warmup_ratio: float, final_ratio: float) -> None:
    if not (warmup_ratio >= 0 and final_ratio >= 0 and warmup_ratio + final_ratio <= 1):
        raise ValueError("dyrank: need warmup_ratio, final_ratio >= 0 with warmup_ratio + final_ratio <= 1")


@dataclass(frozen=True)
class DyRankOptions(TrainOptions):
    """The pruning schedule: warm up, prune on a cubic schedule, then train with the final ranks."""

    dyrank_warmup_ratio: float = option(0.15, "fraction of steps before pruning starts")
    dyrank_final_ratio: float = option(0.5, "fraction of steps at the end trained with the final "
                                            "ranks fixed")
    dyrank_interval: int | None = option(None, "steps between prunings",
                                         default_help="a tenth of the pruning phase")
    dyrank_beta: float = option(0.9, "EMA factor of the importance scores")
    dyrank_reg: float = option(0.1, "weight of the component-variance regulariser while pruning")

    def validate(self, rank: int) -> None:
        _check_ratios(self.dyrank_warmup_ratio, self.dyrank_final_ratio)

    def procedure(self, layers, total_steps: int, rank: int) -> DyRankPruner:
        return DyRankPruner(layers, total_steps, rank, warmup_ratio=self.dyrank_warmup_ratio,
                            final_ratio=self.dyrank_final_ratio, interval=self.dyrank_interval,
                            beta=self.dyrank_beta, reg=self.dyrank_reg)


DYRANK = register_method(Method(
    name="dyrank",
    summary="dynamic-rank DoRA: starts at ceil(1.5 r) components per module, prunes to "
            "an average of r on a cubic schedule; s = alpha/ceil(1.5 r)",
    tensors=("lora_A", "lora_c", "lora_B"),
    # Pruned components have c = 0 (the readers pass the masked c), so they drop out.
    factors=lambda t, s: dyrank_factors(t["lora_A"], t["lora_c"], t["lora_B"], s),
    forward=lambda t, s, x, W=None: s * (mm(x, t["lora_A"]) * t["lora_c"].to(x.dtype)) @ t["lora_B"].to(x.dtype).T,
    check=_check,
    rank=lambda t: int((t["lora_c"] != 0).sum()),
    shape=lambda t: (t["lora_B"].shape[0], t["lora_A"].shape[1]),
    vectors=("lora_c",),
    trainable=("lora_A", "lora_c", "lora_B"),
    init=_init,
    start_rank=dyrank_start_rank,
    options=DyRankOptions,
))
