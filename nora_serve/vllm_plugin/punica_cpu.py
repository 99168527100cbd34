"""A punica wrapper for vLLM's CPU platform that gets mixed batches right.

vLLM-CPU's torch ops index the stacked adapter weights with the per-token slot, and the
"no adapter" slot is -1, which Python indexing wraps to the *last* slot: base-model tokens
batched with adapter tokens get that adapter's delta. Its logits path also applies the
per-request slot table to per-token prompt hidden states when ``prompt_logprobs`` is asked
for, which fails as soon as two requests share a step. This wrapper groups rows by slot, skips
rows without an adapter, and maps prompt-logprob rows back to their tokens' slots.

The forward of the LoRA layers (dense LoRA, shared-basis layers, embeddings) is one function
per kind below, each registered as its own opaque custom op (``opaque.py``): the wrapper's
method calls the function itself in eager mode and the op when traced by torch.compile, and
the op runs that same function. vLLM's layer -> the wrapper's method -> the function -> the
``kernels.cpu_step`` op, which runs the first GEMM: three calls, eager or compiled (where the
graph calls the op, and the op the function).
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from nora_serve.kernels import cpu_step
from nora_serve.serving.routes import Step
from nora_serve.serving.state import WorkerState
from nora_serve.serving.storage import LayerWeights

from . import opaque
from .log import logger
from .punica_base import NoraPunicaOps

Tensor = torch.Tensor


def _groups(indices: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """``[(slot, row_ids)]`` for every slot >= 0 present in ``indices``."""
    out = []
    for slot in torch.unique(indices).tolist():
        if slot < 0:
            continue
        out.append((int(slot), (indices == slot).nonzero().squeeze(1)))
    return out


def _rows(indices: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` per-row slots; rows past the table (padding) have no adapter."""
    if indices.numel() >= n:
        return indices[:n]
    pad = torch.full((n - indices.numel(),), -1, dtype=indices.dtype, device=indices.device)
    return torch.cat([indices, pad])


def _w(stacked: torch.Tensor, slot: int) -> torch.Tensor:
    """One slot of a stacked weight ``[max_loras, 1, a, b]`` (or ``[max_loras, a, b]``)."""
    w = stacked[slot]
    return w[0] if w.dim() == 3 else w


# The dense paths this process has taken, each logged the first time: which one a step ran is
# otherwise invisible (tests and users read it in the worker's log).
_DENSE_PATHS_SEEN: set[str] = set()


def _dense_path_first(path: str, rows: int, slots: int) -> None:
    _DENSE_PATHS_SEEN.add(path)
    logger.info("nora: CPU dense adapters: first step on the %s path (%d rows, %d slots)", path, rows, slots)


def lora_linear(y: Tensor, x: Tensor, wrapper: int, lora_a: list[Tensor], lora_b: list[Tensor],
                scale: float) -> None:
    """Dense LoRA of a stock linear layer (:meth:`NoraPunicaOps.add_lora_linear`) for the
    wrapper registered under ``wrapper``; op ``nora::cpu_lora_linear``."""
    step = opaque.objects[wrapper]._step_for(x.shape[0])
    n = step.rows
    cpu_step.lora_linear(y[:n], x[:n], lora_a, lora_b, step.route("slots"), [step.ranks] * len(lora_a),
                         scale, 0)


def nora_linear(y: Tensor, x: Tensor, wrapper: int, layer: int) -> None:
    """A layer with shared-basis storage (:meth:`NoraPunicaOps.add_nora_linear`): ``layer`` the
    key of its ``LayerWeights``; op ``nora::cpu_nora_linear``."""
    self, w = opaque.objects[wrapper], opaque.objects[layer]
    step = self._step_for(x.shape[0], w.plan)
    n = step.rows
    y, x = y[:n], x[:n]
    packed = w.packed
    dense = step.route("dense")
    if dense.mode != cpu_step.NONE and w.out_scale.count:
        self.scale_output(y, w, step.table("dense"))  # PEFT DoRA, before the LoRA is added
    if dense.mode == cpu_step.NONE:
        pass
    elif not packed:
        cpu_step.lora_linear(y, x, list(w.lora_a), list(w.lora_b),
                             dense, [step.dense_ranks] * len(w.lora_a), 1.0, 0)
    else:
        # Several finite dense slots: padded into one segment each and run as one bmm per stage
        # (enough rows, even segments); else side by side while narrow; else per segment.
        many = dense.mode == cpu_step.SEG and all(w.dense_finite[s] for s in dense.slots)
        padded = step.padded("dense") if many else None
        batch = cpu_step.batch_covering(w.dense_batch(), padded) if padded is not None else None
        stack = w.dense_stack() if many and batch is None else None
        if batch is not None:
            path = "batched"
        elif stack is not None and stack.width <= cpu_step.STACK_MAX_COLUMNS:
            path = "stacked"
        else:
            path = "one" if dense.mode == cpu_step.ALL else "segments"
        if path not in _DENSE_PATHS_SEEN:
            _dense_path_first(path, n, len(dense.slots))
        if path == "batched":
            cpu_step.batched_lora_linear(y, x, batch, padded)
        elif path == "stacked":
            cpu_step.stacked_lora_linear(y, x, stack, keep=step.stack_keep(stack), rows=step.dense_rows())
        else:
            cpu_step.packed_lora_linear(y, x, w.packed_dense, dense)
    groups = step.groups()
    if not any(g is not None for g in groups):
        return
    R = step.plan.core_rank
    L = step.plan.max_loras
    for g, grp in enumerate(groups):
        if grp is None:
            continue
        if packed:
            basis = w.packed_basis[g]
            if basis is None:
                continue
            r = basis.ranks[0]
            if w.cores_all is not None and all(q == r for q in basis.ranks):
                # every slice at rank r: [S, L, r, r], gathered and applied in one op each
                cores = w.cores_all[:, : L * R * R].view(-1, L, R * R)[:, :, : r * r].view(-1, L, r, r)
            else:  # slice i's cores as [L, r, r] views
                cores = [w.cores[i][: L * R * R].view(L, R * R)[:, : r * r].view(L, r, r)
                         for i, r in enumerate(basis.ranks)]
            cpu_step.packed_shared_basis_linear(y, x, basis, cores, grp.core_idx, grp.mask, grp.slot)
            continue
        off = 0
        for i, width in enumerate(w.output_slices):
            r = w.group_rank[i][g]
            if r:
                cores = w.cores[i][: L * R * R].view(L, R * R)[:, : r * r].view(L, r, r)
                cpu_step.shared_basis_linear(y, x, w.basis_a[i][g, :r], w.basis_b[i][g, :, :r],
                                             cores, grp.core_idx, grp.mask, grp.slot, off)
            off += width


def lora_embedding(y: Tensor, x: Tensor, wrapper: int, lora_b: Tensor, add_inputs: bool) -> None:
    """Embedding LoRA, ``y += x @ B[slot].T`` row by row (only the expand); op
    ``nora::cpu_lora_embedding``. Skipped unless a slot of the step has weights there."""
    self = opaque.objects[wrapper]
    if not add_inputs:
        y.zero_()
    if not self._any_live(lora_b, self._step_for(y.shape[0]).route("slots").slots):
        return
    for slot, rows in _groups(self._token_slots(y.shape[0])):
        b = _w(lora_b, slot)
        r = b.shape[-1]
        delta = x.index_select(0, rows)[:, :r].to(y.dtype) @ b.to(y.dtype).T
        n = min(delta.shape[1], y.shape[1])
        y[:, :n].index_add_(0, rows, delta[:, :n])


def dense_embedding(y: Tensor, tokens: Tensor, wrapper: int, lora_a: Tensor, lora_b: Tensor) -> None:
    """Embedding LoRA of the dense-slot layer (``layers.DenseSlotsEmbedding``): ``y[t] +=
    A[d, token_t] @ B[d].T`` for the rows whose adapter holds dense index ``d``; op
    ``nora::cpu_dense_embedding``. Skipped unless such an index has weights there."""
    self = opaque.objects[wrapper]
    step = self._step_for(y.shape[0], self.state.plan)
    if not self._any_live(lora_b, step.route("dense").slots, self.state.plan.dense_owner):
        return
    for d, rows in _groups(step.table("dense")):
        a = lora_a[d].index_select(0, tokens.index_select(0, rows))  # [rows, rank]
        y.index_add_(0, rows, a.to(y.dtype) @ _w(lora_b, d).to(y.dtype).T)


def onednn_prepack() -> cpu_step.Prepack | None:
    """vLLM's oneDNN GEMM on a reordered weight (what its CPU linear layers run), for the
    kernels' shrinks and decode-sized expands (``cpu_step.set_prepack``); ``None`` where this
    build has none."""
    from vllm._custom_ops import _supports_onednn, create_onednn_mm

    if not _supports_onednn:
        return None

    def make(w: Tensor):
        handler = create_onednn_mm(w.t(), 32)  # [k, n], as vLLM passes its layers' weights
        return handler, handler.handler_tensor

    return cpu_step.Prepack(make, torch.ops._C.onednn_mm)


lora_linear_op = opaque.custom_op("cpu_lora_linear", lora_linear)
nora_linear_op = opaque.custom_op("cpu_nora_linear", nora_linear)
lora_embedding_op = opaque.custom_op("cpu_lora_embedding", lora_embedding)
dense_embedding_op = opaque.custom_op("cpu_dense_embedding", dense_embedding)


class NoraPunicaWrapperCPU(PunicaWrapperCPU, NoraPunicaOps):
    """Drop-in for ``PunicaWrapperCPU``: correct no-adapter rows and prompt-logprob logits, each
    adapter read only to its true rank, and the shared-basis layers' forward.

    Everything that depends on the step's token -> slot table is built once per step in
    ``update_metadata`` (:class:`~nora_serve.serving.routes.Step`); a layer's call only runs
    tensor ops on it. Under torch.compile each entry point is its own opaque op (module
    docstring), so no step's routing is baked into the graph.

    ``state``: the worker's :class:`~nora_serve.serving.state.WorkerState` (adapter ranks, slot
    plan, prompt hidden states); ``hooks.py`` builds the wrapper with it (a fresh one by
    default)."""

    def __init__(self, max_num_batched_tokens: int, max_batches: int, device, *,
                 state: WorkerState | None = None, **kwargs):
        super().__init__(max_num_batched_tokens, max_batches, device, **kwargs)
        cpu_step.set_prepack(onednn_prepack())  # before any adapter's weights are packed
        self.state = state if state is not None else WorkerState()
        self._nora_key = opaque.register(self)
        self._step: Step | None = None
        self._live: dict[tuple, bool] = {}  # (stack address, slot, adapter id) -> non-zero

    # -- per step ------------------------------------------------------------------------------
    def update_metadata(self, mapping, lora_index_to_id, max_loras, vocab_size, **kwargs):
        # vLLM's index tables only: its prefill (sgmv) segment tables feed ops this wrapper
        # replaces, and cost host syncs every step.
        self._update_base_metadata(mapping, lora_index_to_id, max_loras, vocab_size)
        self.is_prefill = False
        ids = tuple(lora_index_to_id)
        if self._step is None or self._step.ids != ids:
            self._live.clear()
        plan = self.state.plan
        self._step = Step(self.token_lora_indices, ids, self.state.slot_ranks(lora_index_to_id), plan)
        if plan is not None:  # routes follow later plan changes by themselves (_step_for)
            plan.refreshed_version = plan.version

    def _step_for(self, n: int, plan=None) -> Step:
        """This step's tables for ``n`` rows (rows past the mapping are padding: no adapter),
        with the shared-basis slot ``plan`` of the calling layer."""
        step = self._step
        if step is None:  # before any mapping (profiling runs): no adapter anywhere
            step = self._step = Step(self.token_lora_indices, (), [], None)
        if plan is not None and (step.plan is not plan or step.plan_version != plan.version):
            # Slots were placed after this mapping was built: rebuild.
            step = self._step = Step(step.slots_src, step.ids, step.ranks, plan)
        if n < step.rows:
            return step.first(n)
        return step

    # -- the plugin's ops (punica_base.NoraPunicaOps): the op when traced, the function in eager
    def add_lora_linear(self, y: Tensor, x: Tensor, lora_a_stacked, lora_b_stacked, scale: float,
                        output_slices, *, buffer=None, **kwargs: Any) -> None:
        run = lora_linear_op if torch.compiler.is_compiling() else lora_linear
        run(y.view(-1, y.shape[-1]), x.view(-1, x.shape[-1]), self._nora_key, list(lora_a_stacked),
            list(lora_b_stacked), float(scale))

    def add_nora_linear(self, y: Tensor, x: Tensor, w: LayerWeights) -> None:
        run = nora_linear_op if torch.compiler.is_compiling() else nora_linear
        run(y, x, self._nora_key, w.key)

    # -- other stock layers (fully sharded LoRA): a loop per slot, correct no-adapter rows ---
    def add_shrink(self, y, x: torch.Tensor, lora_a_stacked, scale: float, **kwargs: Any):
        """``y[i][t, :r] = scale * x[t] @ A_i[slot_t].T`` for rows with an adapter, 0 elsewhere."""
        x = x.view(-1, x.shape[-1])
        groups = _groups(self._token_slots(x.shape[0]))
        for i, a_stacked in enumerate(lora_a_stacked):
            out = y[i].view(-1, y[i].shape[-1])
            r = a_stacked.shape[-2]
            out[:, :r] = 0
            for slot, rows in groups:
                a = _w(a_stacked, slot).to(out.dtype)  # [r, d_in]
                out[rows, :r] = scale * (x.index_select(0, rows).to(out.dtype) @ a.T)

    def add_expand(self, y: torch.Tensor, x, lora_b_stacked, output_slices, offset_start: int = 0,
                   add_inputs=True, **kwargs: Any) -> None:
        """``y[t, off_i:off_i+n_i] (+)= x[i][t] @ B_i[slot_t].T``; rows without an adapter get 0."""
        y2 = y.view(-1, y.shape[-1])
        groups = _groups(self._token_slots(y2.shape[0]))
        off = offset_start
        for i, b_stacked in enumerate(lora_b_stacked):
            n = output_slices[i]
            view = y2[:, off:off + n]
            if not add_inputs:
                view.zero_()
            xi = x[i].view(-1, x[i].shape[-1])
            for slot, rows in groups:
                b = _w(b_stacked, slot)  # [n, r]
                r = b.shape[-1]
                delta = xi.index_select(0, rows)[:, :r].to(y.dtype) @ b.to(y.dtype).T
                view.index_add_(0, rows, delta[:, :n])
            off += n

    def _token_slots(self, n: int) -> torch.Tensor:
        return _rows(self.token_lora_indices, n)

    # -- embeddings and logits: skipped unless an adapter of the step has weights there -------
    def _any_live(self, stacked: torch.Tensor, slots, owner=None) -> bool:
        """Whether an index in ``slots`` holds non-zero weights in ``stacked`` (adapters without
        an embedding / lm_head part leave theirs all zero). ``owner(i)``: the adapter holding
        index ``i`` (default: the step's adapter per slot)."""
        ids = self._step.ids if self._step is not None else ()
        if owner is None:
            def owner(s):
                return ids[s] if s < len(ids) else None
        for s in slots:
            if s < 0:
                continue
            key = (stacked.data_ptr(), s, owner(s))
            live = self._live.get(key)
            if live is None:
                live = self._live[key] = bool(stacked[s].any())
            if live:
                return True
        return False

    def add_lora_embedding(self, y: Tensor, x: Tensor, lora_b_stacked: Tensor,
                           add_inputs: bool = True, **kwargs: Any) -> None:
        run = lora_embedding_op if torch.compiler.is_compiling() else lora_embedding
        run(y.view(-1, y.shape[-1]), x, self._nora_key, lora_b_stacked, bool(add_inputs))

    def add_dense_embedding(self, y: Tensor, tokens: Tensor, lora_a_stacked: Tensor,
                            lora_b_stacked: Tensor) -> None:
        run = dense_embedding_op if torch.compiler.is_compiling() else dense_embedding
        run(y, tokens, self._nora_key, lora_a_stacked, lora_b_stacked)

    # -- logits --------------------------------------------------------------------------------
    def _logits_slots(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        per_request = self.sampler_indices
        if per_request.numel() == n:
            return per_request
        base = self.state.prompt_hidden_states
        if base is not None and base.dim() == 2 and x.dim() == 2 and base.stride(0) == x.stride(0):
            row_bytes = base.stride(0) * base.element_size()
            delta = x.data_ptr() - base.data_ptr()
            if delta >= 0 and delta % row_bytes == 0:
                start = delta // row_bytes
                if start + n <= base.shape[0]:
                    return _rows(self.token_lora_indices[start:], n)
        if self.token_lora_indices.numel() == n:
            return self.token_lora_indices
        raise RuntimeError(
            f"nora: cannot map {n} logits rows to adapters ({per_request.numel()} requests, "
            f"{self.token_lora_indices.numel()} tokens in this step)"
        )

    def add_lora_logits(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: torch.Tensor,
                        lora_b_stacked: torch.Tensor, scale, *, buffer=None, **kwargs: Any) -> None:
        y2 = y.view(-1, y.shape[-1])
        x2 = x.view(-1, x.shape[-1])
        if self._step is None:
            return
        plan = self.state.plan if self.state.dense_heads else None
        if plan is None:  # stock stacks: one per slot
            live = self._any_live(lora_b_stacked, self._step.route("slots").slots)
        else:  # layers.DenseSlotsLogits: one per dense index
            step = self._step_for(self._step.rows, plan)
            live = self._any_live(lora_b_stacked, step.route("dense").slots, plan.dense_owner)
        if not live:
            return
        slots = self._logits_slots(x2)
        ranks = self._step.ranks
        if plan is not None:
            slots = plan.dense_of(slots)
            ranks = plan.dense_ranks.tolist()
        route = cpu_step.build_route(slots)
        if lora_b_stacked.shape[-2] <= y2.shape[1]:
            cpu_step.lora_linear(y2, x2, [lora_a_stacked], [lora_b_stacked], route, [ranks], float(scale), 0)
            return
        for slot, rows in _groups(slots):
            a = _w(lora_a_stacked, slot).float()  # [r, hidden]
            b = _w(lora_b_stacked, slot)  # [vocab, r]
            h = scale * (x2.index_select(0, rows).float() @ a.T)
            delta = h.to(y.dtype) @ b.to(y.dtype).T
            n = min(delta.shape[1], y2.shape[1])
            y2[:, :n].index_add_(0, rows, delta[:, :n])

