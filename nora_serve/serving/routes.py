"""The per-step route model of the CPU path: what one step's token -> slot table means for every
LoRA layer, computed once per step (the punica wrapper builds a :class:`Step` in
``update_metadata``) and read by every layer's forward. Plain torch, no vLLM."""

from __future__ import annotations

import torch

from nora_serve.kernels import cpu_step


class _Group:
    """One basis group's rows in a step: ``core_idx`` per row (``None``: all rows use ``slot``),
    ``mask`` of the group's rows (``None``: every row)."""

    __slots__ = ("core_idx", "mask", "slot")

    def __init__(self, core_idx, mask, slot):
        self.core_idx, self.mask, self.slot = core_idx, mask, slot


class Step:
    """What one step's token -> slot table means for every layer, computed once.

    ``route("slots")``: rows -> stacked slot (stock layers); ``route("dense")``: rows -> dense
    index of the shared-basis layers' stack; ``groups()``: per basis group, which rows use it
    and with which slot's core. Built lazily, each at most once per step.

    ``slots_src``: the per-row slot table (int, -1: no adapter); ``ids``: the adapter id per
    slot; ``ranks``: the rank per slot; ``plan``: the shared-basis slot plan (``SlotPlan``) or
    ``None``."""

    def __init__(self, slots_src: torch.Tensor, ids: tuple, ranks: list[int], plan):
        self.slots_src = slots_src
        self.rows = int(slots_src.numel())
        self.slots = slots_src.to(torch.int64)
        self.ids, self.ranks, self.plan = ids, ranks, plan
        self.plan_version = plan.version if plan is not None else None
        self._routes: dict[str, cpu_step.Route] = {}
        self._tables: dict[str, torch.Tensor] = {}
        self._groups: list | None = None
        self._firsts: dict[int, Step] = {}
        self._keeps: dict[tuple, torch.Tensor] = {}
        self._padded: dict[str, cpu_step.Padded | None] = {}
        self.dense_ranks = plan.dense_ranks.tolist() if plan is not None else []

    def first(self, n: int) -> "Step":
        """The same step for its first ``n`` rows."""
        if n not in self._firsts:
            self._firsts[n] = Step(self.slots_src[:n], self.ids, self.ranks, self.plan)
        return self._firsts[n]

    def table(self, tag: str) -> torch.Tensor:
        """Per-row index into a stack (int64, -1: none): ``slots`` or ``dense`` indices."""
        if tag not in self._tables:
            if tag == "slots":
                self._tables[tag] = self.slots
            else:  # "dense"
                self._tables[tag] = self.plan.dense_of(self.slots)
        return self._tables[tag]

    def route(self, tag: str) -> cpu_step.Route:
        if tag not in self._routes:
            self._routes[tag] = cpu_step.build_route(self.table(tag))
        return self._routes[tag]

    def padded(self, tag: str) -> cpu_step.Padded | None:
        """``route(tag)``'s rows padded into one equal segment per slot up to the last used one
        (``cpu_step.pad_route``; ``None`` for few rows or where that would waste too much)."""
        if tag not in self._padded:
            self._padded[tag] = cpu_step.pad_route(self.route(tag))
        return self._padded[tag]

    def dense_rows(self) -> torch.Tensor | None:
        """The rows with a dense slot, in the dense route's order; ``None`` when every row has
        one (the stacked op then runs on the rows as they are, nothing gathered)."""
        route = self.route("dense")
        if route.mode != cpu_step.SEG or route.idx.numel() == self.rows:
            return None
        return route.idx

    def stack_keep(self, stack: cpu_step.Stack) -> torch.Tensor:
        """Which columns of ``stack`` each dense row keeps (``cpu_step.stack_keep``), for the
        rows of :meth:`dense_rows`: once per step and column layout, shared by every layer
        whose stack has that layout."""
        keep = self._keeps.get(stack.key)
        if keep is None:
            rows, table = self.dense_rows(), self.table("dense")
            keep = self._keeps[stack.key] = cpu_step.stack_keep(
                stack, table if rows is None else table.index_select(0, rows))
        return keep

    def groups(self) -> list:
        if self._groups is None:
            plan, out = self.plan, []
            if plan is not None and self.rows:
                valid = self.slots >= 0
                safe = self.slots.clamp(min=0)
                group = torch.where(valid, plan.group_of_slot[safe].long(), -1)
                whole = self.route("slots")
                for g in range(plan.max_groups):
                    mask = group == g
                    count = int(mask.sum())
                    if count == 0:
                        out.append(None)
                    elif count == self.rows and whole.mode == cpu_step.ALL:
                        out.append(_Group(None, None, whole.slot))
                    else:
                        out.append(_Group(safe, None if count == self.rows else mask.unsqueeze(1), -1))
            self._groups = out
        return self._groups
