"""Dynamic-rank DoRA's global pruning schedule (arXiv 2405.17357, as its official code runs it).

Steps ``[0, start)``: warm up (importance EMA only). Steps ``[start, end]``: every ``interval``
steps (and at ``end``) keep the globally most important components, the kept budget falling
cubically from ``total`` to ``modules · r_target``; ``c_k`` of the others is zeroed (they may
regrow until the next pruning, as in the official code). After ``end``: the final mask is fixed
and re-applied every step, and the variance regulariser is off.
"""

from __future__ import annotations

import torch

from nora_serve.methods import dyrank_budget, dyrank_variance_reg

from .layers import DyRankLinear


class DyRankPruner:
    def __init__(
        self,
        layers: dict[str, DyRankLinear],
        total_steps: int,
        r_target: int,
        *,
        warmup_ratio: float = 0.15,
        final_ratio: float = 0.5,
        interval: int | None = None,
        beta: float = 0.9,
        eps: float = 1e-8,
    ):
        if not (warmup_ratio >= 0 and final_ratio >= 0 and warmup_ratio + final_ratio <= 1):
            raise ValueError("dyrank: need warmup_ratio, final_ratio >= 0 with warmup_ratio + final_ratio <= 1")
        self.layers = dict(sorted(layers.items()))
        self.r0 = next(iter(self.layers.values())).r
        if not 0 < r_target <= self.r0:
            raise ValueError(f"dyrank: target rank {r_target} must be in 1..{self.r0}")
        self.r_target = r_target
        self.start = int(total_steps * warmup_ratio)
        self.end = max(self.start, total_steps - 1 - int(total_steps * final_ratio))
        span = self.end - self.start
        self.interval = interval or max(1, span // 10)
        self.beta, self.eps = beta, eps
        self.final = False
        self.history: list[tuple[int, int]] = []  # (step, kept components)

    @property
    def total(self) -> int:
        return sum(layer.r for layer in self.layers.values())

    def reg_active(self, step: int) -> bool:
        return step <= self.end and not self.final

    def regularizer(self) -> torch.Tensor:
        return dyrank_variance_reg(
            [m.lora_A for m in self.layers.values()], [m.lora_B for m in self.layers.values()]
        )

    @torch.no_grad()
    def prune(self, progress: float) -> int:
        """Keep the top components by EMA importance, across all modules; returns how many."""
        budget = dyrank_budget(self.total, self.r0, self.r_target, progress)
        scores = torch.cat([m.score.float().cpu() for m in self.layers.values()])
        # Stable sort: ties broken by module order, then component index (reproducible).
        order = torch.sort(scores, descending=True, stable=True).indices
        keep = torch.zeros_like(scores, dtype=torch.bool)
        keep[order[:budget]] = True
        off = 0
        for m in self.layers.values():
            m.pruned.copy_(~keep[off : off + m.r].to(m.pruned.device))
            m.apply_mask()
            off += m.r
        return budget

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Call after optimizer step ``step`` (0-based)."""
        if self.final or step > self.end:
            self.finish()
            return
        for m in self.layers.values():
            m.update_score(self.beta, self.eps)
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
    def finish(self) -> None:
        """Reach the final budget (even if training stopped early) and fix the mask."""
        if not self.final:
            self.history.append((-1, self.prune(1.0)))
            self.final = True
        for m in self.layers.values():
            m.apply_mask()

    def rank_pattern(self) -> dict[str, int]:
        return {n: m.true_rank for n, m in self.layers.items()}
