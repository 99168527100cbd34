"""Shared-basis storage without a server: the split of native adapters into basis and cores,
the cache's one copy per basis, the slot plan (dense indices, basis groups, eviction) and the
scheduler's per-step caps."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from adapters import make_native_adapters, train_shared_basis_adapters  # noqa: E402


@pytest.fixture(scope="module")
def shared(base_dir, tmp_path_factory):
    return train_shared_basis_adapters(base_dir, tmp_path_factory)


def test_split_reproduces_each_modules_delta(base_dir, tmp_path):
    """B_sh C A_sh equals the method's own ΔW for NoRA and IntTune, module by module."""
    from nora_serve.converters.native import CONFIG_NAME, WEIGHTS_NAME, method_scale, module_factors
    from nora_serve.converters.shared_basis import shared_basis_method, split_shared_basis
    from nora_serve.converters.tensors_io import load_safetensors, read_json

    native = make_native_adapters(base_dir, tmp_path, seed=5)
    assert shared_basis_method(native["lora"]) is None and shared_basis_method(native["slora"]) is None
    for method in ("nora", "inttune"):
        path = native[method]
        assert shared_basis_method(path) == method
        split = split_shared_basis(path)
        cfg, flat = read_json(path / CONFIG_NAME), load_safetensors(path / WEIGHTS_NAME)
        for module in split.modules:
            t = {k.rpartition(".")[2]: v.double() for k, v in flat.items() if k.rpartition(".")[0] == module}
            want = module_factors(method, method_scale(cfg), t).dense()
            got = split.basis[f"{module}.B"].double() @ split.cores[module].double() @ split.basis[f"{module}.A"].double()
            assert torch.allclose(got, want, atol=1e-5), (method, module)


def test_cores_computed_for_all_modules_at_once_equal_each_modules_own(base_dir, shared, tmp_path):
    """The split computes every module's core in one call on a stack of them: bit for bit the
    method's core of each module alone (float64, then float32), format_version 1 and 2."""
    from nora_serve.converters.native import CONFIG_NAME, method_scale
    from nora_serve.converters.shared_basis import split_shared_basis
    from nora_serve.converters.tensors_io import read_json
    from nora_serve.methods import get_method

    native = make_native_adapters(base_dir, tmp_path, seed=5)
    for path in (native["nora"], native["inttune"], shared["nora_a"], shared["inttune_a"]):
        cfg = read_json(path / CONFIG_NAME)
        spec, scale = get_method(cfg["method"]), method_scale(cfg)
        split = split_shared_basis(path)
        from nora_serve.converters import read_adapter

        d = read_adapter(path)
        assert len(split.cores) > 1
        for module, e in d.entries.items():
            own = {k: v.double() for k, v in e.raw.items() if k not in spec.shared}
            assert torch.equal(split.cores[module], spec.core(own, scale).float()), (path.name, module)


def test_adapters_from_one_base_share_one_basis_file(base_dir, shared, tmp_path):
    from nora_serve.serving.cache.build import prepare_adapter
    from nora_serve.serving.cache.trust import shared_basis_entry

    cache = tmp_path / "cache"
    entries = {n: shared_basis_entry(prepare_adapter(p, base=base_dir, max_rank=64, cache_dir=cache).path, cache)
               for n, p in shared.items()}
    assert all(e is not None for e in entries.values())
    assert entries["nora_a"].key == entries["nora_b"].key != entries["inttune_a"].key == entries["inttune_b"].key
    assert sorted(p.name for p in (cache / "bases").iterdir()) == sorted(
        {f"{entries['nora_a'].key}.safetensors", f"{entries['inttune_a'].key}.safetensors"})
    assert entries["nora_a"].cores != entries["nora_b"].cores
    # A plain LoRA entry has no shared-basis part.
    lora = make_native_adapters(base_dir, tmp_path / "n", seed=1)["lora"]
    assert shared_basis_entry(prepare_adapter(lora, base=base_dir, max_rank=64, cache_dir=cache).path, cache) is None


def test_cores_only_entries_cost_what_the_cores_cost(base_dir, shared, tmp_path):
    """A format_version 2 adapter is cached as its cores alone: no folded LoRA written, the
    store's basis file linked once into ``bases/``, a few kB per adapter. Folded only on request
    (a worker putting it in a dense slot), into an entry of its own that stock PEFT loads, and
    equal to the adapter's own delta."""
    import os

    from nora_serve.converters import read_adapter
    from nora_serve.serving.cache.bound import cache_usage
    from nora_serve.serving.cache.build import prepare_adapter
    from nora_serve.serving.cache.keys import ADAPTER_SUBDIR
    from nora_serve.serving.cache.trust import shared_basis_entry

    cache = tmp_path / "cache"
    src = shared["nora_a"]
    assert json.loads((src / "adapter_config.json").read_text())["format_version"] == 2
    p = prepare_adapter(src, base=base_dir, max_rank=64, cache_dir=cache)
    entry = Path(p.path).parent
    assert not (entry / ADAPTER_SUBDIR).exists(), "a cores-only entry holds no folded LoRA"
    info = shared_basis_entry(p.path, cache)
    assert info is not None and info.key == json.loads((src / "adapter_config.json").read_text())["shared_basis"]["digest"]
    store_basis = src.parent / "bases" / f"{info.key}.safetensors"
    assert os.path.samefile(info.basis, store_basis) or info.basis.read_bytes() == store_basis.read_bytes()
    per_adapter = cache_usage(cache).entries[entry.name][1]
    assert per_adapter < 100_000, per_adapter
    # Asked again: a hit, same entry. Folded on request: its own entry, a PEFT LoRA.
    assert prepare_adapter(src, base=base_dir, max_rank=64, cache_dir=cache).path == p.path
    f = prepare_adapter(p.path, base=base_dir, max_rank=64, cache_dir=cache, folded=True)
    assert Path(f.path).parent != entry and (Path(f.path) / "adapter_config.json").is_file()
    assert prepare_adapter(src, base=base_dir, max_rank=64, cache_dir=cache, folded=True).path == f.path
    want, got = read_adapter(src, base=base_dir), read_adapter(f.path, base=base_dir)
    for m, e in want.entries.items():
        assert torch.allclose(got.entries[m].factors(torch.float64).dense(), e.factors(torch.float64).dense(), atol=1e-4), m


def _st(kind, key=None, rank=8):
    from nora_serve.serving.storage import AdapterStorage

    return AdapterStorage(kind, rank=rank, basis_key=key)


class _Slots:
    """vLLM's slot list and deactivation, as the model manager keeps them."""

    def __init__(self, n):
        self.ids: list[int | None] = [None] * n

    def free(self):
        return self.ids.index(None) if None in self.ids else None

    def place(self, plan, lora_id, storage, batch=None):
        act = plan.assign(lora_id, self.free, storage, {i for i in self.ids if i is not None}, batch,
                          self.evict)
        self.ids[act.slot] = lora_id
        return act

    def evict(self, lora_id):
        self.ids[self.ids.index(lora_id)] = None


def test_slot_plan_dense_and_groups():
    from nora_serve.serving.storage import BASIS, DENSE, EMPTY, SlotPlan, StorageFull

    plan, slots = SlotPlan(6, 2, 2, 8, "cpu"), _Slots(6)
    a = slots.place(plan, 1, _st(DENSE, rank=4))
    b = slots.place(plan, 2, _st(BASIS, "k1"))
    c = slots.place(plan, 3, _st(BASIS, "k1"))
    d = slots.place(plan, 4, _st(DENSE, rank=16))
    e = slots.place(plan, 5, _st(EMPTY))
    assert (a.dense, d.dense) == (0, 1) and b.group == c.group == 0 and e.dense == e.group == -1
    assert plan.dense_of_slot.tolist() == [0, -1, -1, 1, -1, -1]
    assert plan.group_of_slot.tolist() == [-1, 0, 0, -1, -1, -1]
    assert plan.dense_ranks.tolist() == [4, 16]
    # A third dense adapter takes the index of one this step does not need.
    f = slots.place(plan, 6, _st(DENSE, rank=2), batch={4, 6})
    assert f.dense == 0 and 1 not in slots.ids and plan.dense_ranks.tolist() == [2, 16]
    assert plan.dense_of_slot[f.slot] == 0
    # A second basis gets the free group; a third evicts the group this step does not need.
    g = slots.place(plan, 7, _st(BASIS, "k2"), batch={7})
    assert g.group == 1
    h = slots.place(plan, 8, _st(BASIS, "k3"), batch={7, 8})
    assert h.group == 0 and 2 not in slots.ids and 3 not in slots.ids
    # Everything needed by this step: a clear error instead of a wrong result.
    with pytest.raises(StorageFull, match="--nora-dense-loras"):
        slots.place(plan, 9, _st(DENSE), batch={4, 6, 9})
    with pytest.raises(StorageFull, match="--nora-max-bases"):
        slots.place(plan, 10, _st(BASIS, "k4"), batch={7, 8, 10})


def test_step_limits_defer_past_the_caps(shared, base_dir, tmp_path):
    from vllm.lora.request import LoRARequest

    from nora_serve.serving.cache.build import prepare_adapter
    from nora_serve.serving.scheduling import StepLimits
    from nora_serve.serving.settings import NoraSettings

    cache = tmp_path / "cache"
    native = make_native_adapters(base_dir, tmp_path / "n", seed=2)
    paths = {n: prepare_adapter(p, base=base_dir, max_rank=64, cache_dir=cache).path
             for n, p in {**shared, "lora": native["lora"], "dyrank": native["dyrank"],
                          "slora": native["slora"]}.items()}
    reqs = {n: LoRARequest(n, i + 1, p) for i, (n, p) in enumerate(sorted(paths.items()))}
    # Only entries of the server's own cache are trusted: the settings name that cache.
    limits = StepLimits(NoraSettings(dense_loras=2, max_bases=1, cache_dir=str(cache)), max_loras=64)

    class Running:
        def __init__(self, r):
            self.lora_request = r

    limits.start_step([Running(reqs["lora"])])
    assert limits.admit(reqs["lora"]) and limits.admit(reqs["dyrank"])
    assert not limits.admit(reqs["slora"])  # a third dense adapter waits
    assert limits.admit(reqs["nora_a"]) and limits.admit(reqs["nora_b"])  # one basis, many cores
    assert not limits.admit(reqs["inttune_a"])  # a second basis waits
    limits.start_step([])
    assert limits.admit(reqs["inttune_a"]) and limits.admit(reqs["slora"])
    # core_rank 0 turns shared-basis storage off: every adapter is dense.
    off = StepLimits(NoraSettings(core_rank=0, dense_loras=2, cache_dir=str(cache)), max_loras=64)
    off.start_step([])
    assert off.admit(reqs["nora_a"]) and off.admit(reqs["nora_b"]) and not off.admit(reqs["inttune_a"])


def test_nora_flags_reach_the_settings(base_dir):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from nora_serve.serving.settings import NoraSettings

    parser = make_arg_parser(FlexibleArgumentParser())
    args = parser.parse_args(["--model", str(base_dir), "--enable-nora", "--nora-dense-loras", "4",
                              "--nora-max-bases", "3", "--nora-core-rank", "16"])
    s = NoraSettings.from_additional_config(AsyncEngineArgs.from_cli_args(args).additional_config)
    assert (s.dense_loras, s.max_bases, s.core_rank) == (4, 3, 16) and s.dense_slots(1024) == 4
    assert NoraSettings().dense_slots(12) == 12 and NoraSettings().shared_basis
    with pytest.raises(ValueError, match="--nora-dense-loras"):
        AsyncEngineArgs.from_cli_args(parser.parse_args(["--model", str(base_dir), "--enable-nora",
                                                         "--nora-dense-loras", "0"]))


def _cpu_wrapper_case():
    """The CPU wrapper after the cases' mapping, its row count (mapped rows + 2 padding), inputs
    and base outputs."""
    import nora_layer_cases as cases
    from vllm.lora.layers import LoRAMapping

    from nora_serve.vllm_plugin.punica_cpu import NoraPunicaWrapperCPU

    w = NoraPunicaWrapperCPU(64, 16, "cpu")
    w.update_metadata(LoRAMapping(cases.MAPPING, cases.MAPPING, is_prefill=True), cases.SLOT_IDS,
                      cases.MAX_LORAS, 100)
    rows = len(cases.MAPPING) + 2
    x = torch.randn(rows, cases.D_IN, generator=torch.Generator().manual_seed(1))
    base = torch.randn(rows, sum(cases.SLICES), generator=torch.Generator().manual_seed(2))
    return w, rows, x, base


@pytest.mark.parametrize("packed", ["no", "segments", "stacked", "batched"],
                         ids=["per-slice", "slice-packed", "slice-packed-stacked", "slice-packed-batched"])
def test_cpu_wrapper_applies_dense_and_shared_basis_slots(packed, monkeypatch):
    """add_nora_linear on the CPU: dense slots, two basis groups, an empty slot, a warm-up
    dummy, no-adapter and padding rows, each row gets exactly its own ΔW x; with the weights
    per slice and slice-packed as the layers keep them on the CPU (the dense slots per
    segment, side by side, or as bmm batches)."""
    import nora_layer_cases as cases

    from nora_serve.kernels import cpu_step

    lay, plan, want = cases.build()
    if packed != "no":  # as layers.py packs them
        cases.pack_like_layers(lay, stacked=packed == "stacked", batched=packed == "batched")
    batched = []
    run = cpu_step.batched_lora_linear
    monkeypatch.setattr(cpu_step, "BATCH_MIN_ROWS", 1)  # the case's few rows through the batched op too
    monkeypatch.setattr(cpu_step, "batched_lora_linear", lambda *a: batched.append(1) or run(*a))
    w, rows, x, base = _cpu_wrapper_case()
    y = base.clone()
    w.add_nora_linear(y, x, cases.weights(lay))
    assert len(batched) == (packed == "batched")
    torch.testing.assert_close((y - base).double(), cases.reference(x, want, rows), atol=1e-5, rtol=1e-5)
    # A changed plan (new version) is seen at once, without a new mapping.
    plan.group_of_slot[3] = -1
    plan.version += 1
    y2 = base.clone()
    w.add_nora_linear(y2, x, cases.weights(lay))
    moved = (y2 - y).abs().sum(1)
    assert moved[[3, 9]].min() > 0 and moved[[i for i in range(rows) if i not in (3, 9)]].max() == 0


def test_cpu_wrapper_scales_the_base_output_of_dora_rows():
    """PEFT DoRA's per-row output scale: rows of the scaled dense slot get ``v ⊙ base + ΔW x``;
    every other row (another dense slot, basis groups, no adapter, padding) is untouched."""
    import nora_layer_cases as cases

    lay, plan, want = cases.build()
    slot = 0  # dense, lora id 11
    dense = int(plan.dense_of_slot[slot])
    v = [1 + 0.5 * torch.rand(n, generator=torch.Generator().manual_seed(3 + i)) for i, n in enumerate(cases.SLICES)]
    lay.nora_out_scale.set(dense, v)
    w, rows, x, base = _cpu_wrapper_case()
    y = base.clone()
    w.add_nora_linear(y, x, cases.weights(lay))
    scaled = torch.tensor([lid == cases.SLOTS[slot][0] for lid in cases.MAPPING] + [False, False])
    want_y = base.double() + cases.reference(x, want, rows)
    want_y[scaled] += (torch.cat(v).double() - 1) * base[scaled].double()
    torch.testing.assert_close(y.double(), want_y, atol=1e-5, rtol=1e-5)
    assert scaled.any() and (~scaled).any()
    lay.nora_out_scale.set(dense, None)  # unloaded: back to 1 everywhere
    y = base.clone()
    w.add_nora_linear(y, x, cases.weights(lay))
    torch.testing.assert_close(y.double(), base.double() + cases.reference(x, want, rows), atol=1e-5, rtol=1e-5)


def test_slot_plan_fits_tells_a_placement_without_eviction():
    """``SlotPlan.fits``: what a bulk load (--nora-preload-store) may activate without evicting."""
    from nora_serve.serving.storage import BASIS, DENSE, EMPTY, SlotPlan

    plan, slots = SlotPlan(8, 1, 1, 8, "cpu"), _Slots(8)
    active = lambda: {i for i in slots.ids if i is not None}  # noqa: E731
    assert plan.fits(_st(DENSE), active()) and plan.fits(_st(BASIS, "k1"), active())
    slots.place(plan, 1, _st(DENSE))
    slots.place(plan, 2, _st(BASIS, "k1"))
    assert not plan.fits(_st(DENSE), active())  # the one dense index is held
    assert plan.fits(_st(BASIS, "k1"), active())  # joins its basis's group
    assert not plan.fits(_st(BASIS, "k2"), active())  # the one group is held by k1
    assert plan.fits(_st(EMPTY), active())
    slots.evict(2)
    assert plan.fits(_st(BASIS, "k2"), active())  # the group has no active member left


def test_step_limits_available_checks_again_only_what_changed(shared, tmp_path, monkeypatch):
    """``StepLimits.available`` (asked for every waiting request at every step): after a found
    entry only a stat of it and of the adapter's files; an entry removed or an adapter changed
    is looked up (and prepared) again, an adapter gone is a refusal."""
    import shutil

    from vllm.lora.request import LoRARequest

    from nora_serve.serving import scheduling
    from nora_serve.serving.scheduling import StepLimits
    from nora_serve.serving.settings import NoraSettings

    cache, src = tmp_path / "cache", tmp_path / "a"
    shutil.copytree(shared["nora_a"], src)
    if not (src.parent / "bases").exists():
        shutil.copytree(shared["nora_a"].parent / "bases", src.parent / "bases")
    limits = StepLimits(NoraSettings(cache_dir=str(cache)), max_loras=8)
    req = LoRARequest("a", 7, str(src))
    lookups = []
    real = scheduling.lookup_entry
    monkeypatch.setattr(scheduling, "lookup_entry", lambda *a, **kw: lookups.append(1) or real(*a, **kw))
    assert limits.available(req) and len(lookups) == 1  # prepared into the cache
    assert limits.available(req) and limits.available(req) and len(lookups) == 1
    assert limits.kind(req) is not None and len(lookups) == 1  # the scheduler's kind: the same entry
    for entry in cache.iterdir():  # an eviction / an operator removes the entry
        if entry.name not in ("bases", "ids"):
            shutil.rmtree(entry)
    assert limits.available(req) and len(lookups) == 2  # prepared again
    cfg = src / "adapter_config.json"
    cfg.write_text(cfg.read_text() + "\n")  # the adapter changed
    assert limits.available(req) and len(lookups) == 3
    shutil.rmtree(src)  # the adapter is gone: its request fails
    assert not limits.available(req)


def test_bulk_loaded_cores_are_laid_out_as_set_lora_lays_them():
    """A preload sets every slot's cores aside and writes them per slice in one copy
    (``nora_flush_cores``): the slots' storage must end up exactly as one ``set_lora`` per
    slot leaves it, stale blocks cleared, smaller cores zero-padded to the group's rank."""
    from types import SimpleNamespace

    from nora_serve.serving.state import WorkerState
    from nora_serve.serving.storage import BASIS, Activation, AdapterStorage
    from nora_serve.vllm_plugin.layers import SharedBasisLayerMixin as M

    R, L, G = 16, 8, 2
    group_rank = [[16, 8], [8, 8], [12, 4]]  # per slice, per group

    def layer():
        state = WorkerState()
        torch.manual_seed(0)
        lay = SimpleNamespace(
            nora_state=state, nora_plan=SimpleNamespace(core_rank=R), _nora_pending={},
            nora_cores=[torch.randn(L * R * R) for _ in range(3)],  # stale: a warm-up's leftovers
            nora_core_ranks=torch.full((3, L), 7, dtype=torch.int32),
            nora_group_rank=group_rank, _load_basis=lambda act: None)
        for name in ("_activation", "_clear_cores", "_stored_rank", "set_lora", "nora_flush_cores"):
            setattr(lay, name, getattr(M, name).__get__(lay))
        return lay

    gen = torch.Generator().manual_seed(1)
    slots = {1: (0, [torch.randn(16, 16, generator=gen), torch.randn(8, 8, generator=gen),
                     torch.randn(8, 8, generator=gen)]),   # padded to 12 in slice 2
             3: (1, [torch.randn(8, 8, generator=gen), None, torch.randn(4, 4, generator=gen)]),
             6: (0, [torch.randn(16, 16, generator=gen), torch.randn(8, 8, generator=gen), None])}
    one_by_one, bulk = layer(), layer()
    for lay, preloading in ((one_by_one, False), (bulk, True)):
        lay.nora_state.preloading = preloading
        for slot, (group, cores) in slots.items():
            lay.nora_state.activation = Activation(slot, AdapterStorage(BASIS, rank=16, basis_key="k"), group=group)
            lay.set_lora(slot, cores, None)
        lay.nora_state.activation = None
    assert bulk._nora_pending and torch.equal(bulk.nora_core_ranks, torch.full((3, L), 7, dtype=torch.int32))
    bulk.nora_flush_cores()
    assert not bulk._nora_pending
    assert torch.equal(bulk.nora_core_ranks, one_by_one.nora_core_ranks)
    assert one_by_one.nora_core_ranks[2, 1] == 12 and one_by_one.nora_core_ranks[1, 3] == 0
    for got, want in zip(bulk.nora_cores, one_by_one.nora_cores):
        assert torch.equal(got, want)
    # The untouched slots keep what they held; the written ones hold their cores.
    assert torch.equal(bulk.nora_cores[0][0:R * R], layer().nora_cores[0][0:R * R])
    blk = bulk.nora_cores[2][1 * R * R: 1 * R * R + 144].view(12, 12)
    assert torch.equal(blk[:8, :8], slots[1][1][2]) and not blk[8:].any() and not blk[:, 8:].any()
