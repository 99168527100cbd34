"""Serving under churn, faults and hostile input (one real ``nora-serve`` per module, as a new
user starts it: ``--enable-nora --nora-adapter-dir STORE``, runtime loading not opened), and
servers of their own for what needs other flags or disks: two API servers on one engine, a
cache bound far below the store, a full and a read-only cache disk (these run first, before the
module's server starts, so that two servers never share the two cores).

Without a server: the plugin's vLLM symbols against the installed vLLM and an inert
``register()`` on a mismatch; the slot plan under scheduler-admitted churn; the cache's trust
rule, size bound and answers that do not tell which paths exist.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from adapters import make_native_adapters  # noqa: E402
from reference import reference_run  # noqa: E402
from vllm_server import NORA_ENTRY, VLLMServer  # noqa: E402

PROMPTS = ([1, 23, 112, 123, 18, 47, 40, 109], [5, 9, 13, 40, 41, 42, 7, 3])
N_TOKENS = 4
MAX_RANK = 16
CHURN_THREADS, CHURN_PER_THREAD, CHURN_ROUNDS = 4, 50, 5
FIGURES: dict = {}  # printed at the end of the module (README "Reliability")


# -- no server ------------------------------------------------------------------------------------
def test_vllm_table_checks_clean_against_installed_vllm():
    from nora_serve.vllm_plugin import hooks, vllm_surface

    assert vllm_surface.check(gpu=True) == []
    assert vllm_surface.refusal() is None
    # The docstring points to the table instead of copying it.
    assert "vllm_surface.TABLE" in hooks.__doc__
    # What register() checked before the table are rows of it.
    places = {(r.module, r.path) for r in vllm_surface.TABLE}
    for place in (("vllm.engine.arg_utils", "EngineArgs.add_cli_args"),
                  ("vllm.lora.model_manager", "LoRAModelManager.activate_adapter"),
                  ("vllm.lora.punica_wrapper.punica_gpu", "PunicaWrapperGPU"),
                  ("vllm.v1.metrics.loggers", "PrometheusStatLogger.record")):
        assert place in places, place


_INERT_CHILD = r"""
import logging, sys
logging.basicConfig(level=logging.ERROR, stream=sys.stdout)
from vllm.engine.arg_utils import EngineArgs
from vllm.v1.core.sched.scheduler import Scheduler
before = (EngineArgs.add_cli_args, Scheduler.schedule)
import nora_serve.vllm_plugin as plugin
from nora_serve.vllm_plugin import vllm_surface
table = vllm_surface.TABLE
# A renamed method the plugin wraps.
vllm_surface.TABLE = table + (vllm_surface.Name("vllm.lora.model_manager",
                              "LoRAModelManager.renamed_in_a_new_vllm", "wrap", "test"),)
plugin.register()
assert (EngineArgs.add_cli_args, Scheduler.schedule) == before, "patched despite the mismatch"
assert "renamed_in_a_new_vllm" in plugin.inert_reason, plugin.inert_reason
# An override vLLM no longer calls where the plugin expects (it would fail silently).
vllm_surface.TABLE = table + (vllm_surface.Name(
    "vllm.lora.layers.base_linear", "BaseLinearLayerWithLoRA._apply_lora_to_output", "override", "test",
    used_by="BaseLinearLayerWithLoRA.create_lora_weights"),)
plugin.register()
assert (EngineArgs.add_cli_args, Scheduler.schedule) == before
assert "no longer names _apply_lora_to_output" in plugin.inert_reason, plugin.inert_reason
vllm_surface.TABLE = table
vllm_surface.SUPPORTED_VLLM = ((0, 31), (0, 34))
plugin.register()
assert (EngineArgs.add_cli_args, Scheduler.schedule) == before
assert "not supported" in plugin.inert_reason, plugin.inert_reason
# A plain vLLM engine-args round trip still works.
EngineArgs.from_cli_args
print("INERT-OK")
"""


def test_register_stays_inert_on_a_vllm_mismatch():
    p = subprocess.run([sys.executable, "-c", _INERT_CHILD], capture_output=True, text=True, timeout=600)
    out = p.stdout + p.stderr
    assert p.returncode == 0 and "INERT-OK" in out, out[-3000:]
    assert out.count("nora: plugin not installed") == 1, out[-3000:]  # one line, the first reason


def test_runtime_loading_stays_off_without_an_explicit_flag(base_dir, tmp_path, monkeypatch):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "0")
    monkeypatch.delenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING")  # restored afterwards
    parser = make_arg_parser(FlexibleArgumentParser())
    AsyncEngineArgs.from_cli_args(parser.parse_args(["--model", str(base_dir), "--nora-adapter-dir", str(tmp_path)]))
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in os.environ
    AsyncEngineArgs.from_cli_args(parser.parse_args(["--model", str(base_dir), "--nora-adapter-dir", str(tmp_path),
                                                     "--nora-allow-runtime-loading"]))
    assert os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING") == "1"


class _Manager:
    """vLLM's LRU model manager as the plan sees it: ``max_loras`` slots, the least recently
    activated adapter deactivated first, and the activation hook calling ``plan.assign``."""

    def __init__(self, plan, max_loras):
        self.plan, self.ids = plan, [None] * max_loras
        self.active: OrderedDict[int, None] = OrderedDict()

    def deactivate(self, lid):
        if lid in self.active:
            self.ids[self.ids.index(lid)] = None
            del self.active[lid]

    def activate(self, lid, storage, batch):
        if lid in self.active:
            self.active.move_to_end(lid)
            return
        if len(self.active) >= len(self.ids):
            self.deactivate(next(iter(self.active)))
        act = self.plan.assign(lid, lambda: self.ids.index(None), storage, set(self.active), batch,
                               self.deactivate)
        self.ids[act.slot] = lid
        self.active[lid] = None


@pytest.mark.parametrize("max_loras,dense,bases", [(2, None, 4), (4, 2, 1), (8, 3, 2)])
def test_slot_plan_holds_every_step_the_scheduler_admits(max_loras, dense, bases):
    """Random churn over 12 adapters (dense ones and three bases), steps admitted by the
    scheduler's caps (StepLimits) and vLLM's --max-loras: activation never fails, and every
    active adapter owns its own dense index or a group of its own basis."""
    from nora_serve.serving.scheduling import StepLimits
    from nora_serve.serving.settings import NoraSettings
    from nora_serve.serving.storage import BASIS, DENSE, AdapterStorage, SlotPlan

    settings = NoraSettings(dense_loras=dense, max_bases=bases, core_rank=8)
    kinds = {i: (None if i % 3 else f"basis{i % 4}") for i in range(1, 13)}

    class Req:
        def __init__(self, lid):
            self.lora_int_id, self.lora_path = lid, f"/a/{lid}"

    limits = StepLimits(settings, max_loras)
    limits.kind = lambda r: kinds[r.lora_int_id]
    plan = SlotPlan(max_loras, settings.dense_slots(max_loras), bases, 8, "cpu")
    mgr = _Manager(plan, max_loras)
    rng = random.Random(max_loras)
    for _ in range(600):
        limits.start_step([])
        batch = []
        for lid in rng.sample(sorted(kinds), rng.randint(1, 6)):
            if len(set(batch) | {lid}) > max_loras:
                continue  # vLLM's own --max-loras check
            if limits.admit(Req(lid)):
                batch.append(lid)
        for lid in batch:
            st = AdapterStorage(DENSE, rank=4) if kinds[lid] is None else AdapterStorage(BASIS, 8, kinds[lid])
            mgr.activate(lid, st, set(batch))
        dense_idx = [plan.dense_of_slot[mgr.ids.index(lid)].item() for lid in batch if kinds[lid] is None]
        assert len(dense_idx) == len(set(dense_idx)) and min(dense_idx, default=0) >= 0
        for lid in batch:
            if kinds[lid] is not None:
                g = plan.group_of_slot[mgr.ids.index(lid)].item()
                assert plan._group_key[g] == kinds[lid]


def _peft_lora(out: Path, base_dir: Path, seed: int, r: int = 4, alpha: float = 8.0,
               base_name: str | None = None) -> Path:
    from reference import base_modules, base_weights

    W = base_weights(base_dir)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for m in base_modules(base_dir)[:4]:
        d_out, d_in = W[m + ".weight"].shape
        tensors[f"base_model.model.{m}.lora_A.weight"] = torch.randn(r, d_in, generator=g) * 0.2
        tensors[f"base_model.model.{m}.lora_B.weight"] = torch.randn(d_out, r, generator=g) * 0.2
    out.mkdir(parents=True)
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "task_type": "CAUSAL_LM",
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "base_model_name_or_path": base_name if base_name is not None else str(base_dir)}))
    save_file(tensors, str(out / "adapter_model.safetensors"))
    return out


def test_forged_or_changed_cache_entries_are_not_trusted(base_dir, tmp_path):
    from nora_serve.converters.errors import AdapterError
    from nora_serve.serving.cache.build import prepare_adapter
    from nora_serve.serving.cache.keys import ADAPTER_SUBDIR, MARKER

    cache = tmp_path / "cache"
    # X/adapter with NaN weights and X/nora-cache.json beside it: read and refused.
    forged = _peft_lora(tmp_path / "X" / ADAPTER_SUBDIR, base_dir, 1)
    t = load_file(str(forged / "adapter_model.safetensors"))
    next(iter(t.values()))[0, 0] = float("nan")
    save_file(t, str(forged / "adapter_model.safetensors"))
    (tmp_path / "X" / MARKER).write_text("{}")
    with pytest.raises(AdapterError, match="(?i)nan"):
        prepare_adapter(forged, base=base_dir, max_rank=MAX_RANK, cache_dir=cache)
    # A real entry changed on disk afterwards is converted again, not used.
    good = _peft_lora(tmp_path / "good", base_dir, 2)
    first = prepare_adapter(good, base=base_dir, max_rank=MAX_RANK, cache_dir=cache)
    assert prepare_adapter(first.path, base=base_dir, max_rank=MAX_RANK, cache_dir=cache).path == first.path
    f = Path(first.path) / "adapter_model.safetensors"
    t = load_file(str(f))
    next(iter(t.values()))[0, 0] = float("nan")
    save_file(t, str(f))
    again = prepare_adapter(good, base=base_dir, max_rank=MAX_RANK, cache_dir=cache)
    assert again.converted_now and again.path == first.path
    assert all(torch.isfinite(v).all() for v in load_file(str(f)).values())
    # The same entry copied anywhere else is no cache entry: it is read as a plain adapter.
    copy = tmp_path / "elsewhere"
    shutil.copytree(Path(first.path).parent, copy)
    moved = prepare_adapter(copy / ADAPTER_SUBDIR, base=base_dir, max_rank=MAX_RANK, cache_dir=cache)
    assert moved.fmt == "peft_lora"


def test_not_found_answers_do_not_tell_what_exists(tmp_path):
    from nora_serve.vllm_plugin.serving import _local_adapter_dir

    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    messages = set()
    for p in (tmp_path / "missing", tmp_path / "empty", tmp_path / "file", "/etc", "/root/.ssh", "x" * 5000):
        with pytest.raises(FileNotFoundError) as e:
            _local_adapter_dir(str(p))
        messages.add(str(e.value))
    assert len(messages) == 1, messages


def test_cache_bound_evicts_least_recently_used_not_in_use(base_dir, tmp_path):
    from nora_serve.serving.cache.bound import cache_usage, enforce_limit
    from nora_serve.serving.cache.build import prepare_adapter

    cache = tmp_path / "cache"
    keys = []
    for i in range(8):
        p = prepare_adapter(_peft_lora(tmp_path / f"a{i}", base_dir, 10 + i), base=base_dir,
                            max_rank=MAX_RANK, cache_dir=cache)
        keys.append(p.key)
        time.sleep(0.02)
    one = max(b for _, b, _ in cache_usage(cache).entries.values())
    # a1 used again (newest now), a0 in use: the bound of 3 entries removes a2..a6.
    prepare_adapter(tmp_path / "a1", base=base_dir, max_rank=MAX_RANK, cache_dir=cache)
    removed = enforce_limit(cache, 3 * one + one // 2, in_use={keys[0]})
    assert sorted(removed) == sorted(keys[2:7])
    assert set(cache_usage(cache).entries) == {keys[0], keys[1], keys[7]}
    assert cache_usage(cache).total <= 3 * one + one // 2


def test_negative_alpha_and_named_other_base_refused(base_dir, tmp_path):
    from nora_serve.converters import read_adapter
    from nora_serve.converters.errors import AdapterError
    from nora_serve.tiny import make_tiny_llama

    with pytest.raises(AdapterError, match="lora_alpha must be a finite number > 0"):
        read_adapter(_peft_lora(tmp_path / "neg", base_dir, 3, alpha=-8.0), base=base_dir)
    other = make_tiny_llama(tmp_path / "other_base", seed=123)
    with pytest.raises(AdapterError, match="made for another base model"):
        read_adapter(_peft_lora(tmp_path / "other", other, 4, base_name=str(other)), base=base_dir)
    # Named by a path that does not exist here: nothing to check, accepted.
    read_adapter(_peft_lora(tmp_path / "hub", base_dir, 5, base_name="meta-llama/Llama-2-7b-hf"), base=base_dir)


# -- one server ------------------------------------------------------------------------------------
_KILL_CHILD = r"""
import sys, time
import nora_serve.converters as conv
from nora_serve.serving.cache.build import prepare_adapter
real = conv.convert_adapter
def slow(*a, **kw):
    r = real(*a, **kw)
    print("MID-CONVERSION", flush=True)
    time.sleep(600)
    return r
conv.convert_adapter = slow
prepare_adapter(sys.argv[1], base=sys.argv[2], max_rank=int(sys.argv[3]), cache_dir=sys.argv[4])
"""


def _kill_mid_conversion(src: Path, base_dir: Path, cache: Path) -> list[str]:
    """Start a conversion into ``cache`` and kill -9 it half way; returns what it left."""
    p = subprocess.Popen([sys.executable, "-c", _KILL_CHILD, str(src), str(base_dir), str(MAX_RANK), str(cache)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in p.stdout:
        if "MID-CONVERSION" in line:
            break
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=60)
    return [n.name for n in cache.iterdir() if ".tmp-" in n.name]


# -- servers of their own (before the module's server starts) ------------------------------------
def _store_of(base_dir, root: Path, n_lora: int = 2) -> tuple[Path, list[str]]:
    """A store: the six native methods plus ``n_lora`` PEFT LoRAs, all different."""
    store = root / "store"
    store.mkdir(parents=True)
    for m, p in make_native_adapters(base_dir, root / "native", seed=11).items():
        shutil.copytree(p, store / f"n_{m}")
    for i in range(n_lora):
        _peft_lora(store / f"p_{i}", base_dir, 40 + i)
    return store, sorted(p.name for p in store.iterdir())


def _reference(base_dir, store: Path, names) -> dict:
    """Greedy tokens of each adapter and prompt by transformers on the merged weights."""
    want = {(n, i): reference_run(str(base_dir), str(store / n), tuple(p), N_TOKENS)["tokens"]
            for n in names for i, p in enumerate(PROMPTS)}
    assert len({tuple(v) for (n, i), v in want.items() if i == 0}) >= len(names) - 1, "adapters too alike"
    return want


def _nora_server(base_dir, store, cache, *extra):
    return VLLMServer(base_dir, ["--enable-nora", "--nora-adapter-dir", str(store), "--nora-cache-dir", str(cache),
                                 "--max-lora-rank", str(MAX_RANK), *extra], entry=NORA_ENTRY,
                      env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "0"})


@pytest.mark.server
def test_two_api_servers_serve_each_adapter_its_own_answers(base_dir, tmp_path):
    """``--api-server-count 2`` with the store: every adapter has one id in both API servers, so
    no adapter answers for another (before, 2 of 3 answers of some adapters were another's)."""
    store, names = _store_of(base_dir, tmp_path)
    want = _reference(base_dir, store, names)
    jobs = [(n, k % len(PROMPTS)) for n in names for k in range(20)]
    random.Random(0).shuffle(jobs)
    with _nora_server(base_dir, store, tmp_path / "cache", "--api-server-count", "2",
                      "--max-loras", "4", "--max-cpu-loras", "4") as srv:
        with ThreadPoolExecutor(4) as ex:
            results = list(ex.map(lambda j: (j, _complete(srv, j[0], PROMPTS[j[1]])), jobs))
        wrong = [(j, r) for j, r in results if r != (200, want[j])]
        ids = {m["id"] for m in srv.get("/v1/models").json()["data"]}
        assert srv.get("/health").status_code == 200
    FIGURES.update(api_servers=2, api_server_adapters=len(names), api_server_requests=len(jobs),
                   api_server_wrong=len(wrong))
    assert not wrong, wrong[:5]
    assert ids  # answered by one of the two; each lists what it served


@pytest.mark.server
def test_cache_bound_holds_under_concurrent_first_loads(base_dir, tmp_path):
    """A bound far below the store: 6 concurrent first requests at a time over 24 adapters, all
    answered right; idle store adapters are evicted and resolved again; the cache ends within its
    bound plus the entries of what is running. An entry removed under a loaded adapter is
    prepared again from its source; an adapter whose source is gone too fails alone."""
    from nora_serve.serving.cache.bound import cache_usage

    store, names = _store_of(base_dir, tmp_path, n_lora=18)
    want = _reference(base_dir, store, names)
    cache = tmp_path / "cache"
    bound = 300_000
    with _nora_server(base_dir, store, cache, "--nora-cache-max-gb", str(bound / 1e9),
                      "--max-loras", "2", "--max-cpu-loras", "2") as srv:
        failures, biggest = [], 0
        for rnd in range(2):
            order = names[:]
            random.Random(rnd).shuffle(order)
            for k in range(0, len(order), 6):
                jobs = [(n, (rnd + k) % len(PROMPTS)) for n in order[k:k + 6]]
                go = threading.Barrier(len(jobs))

                def run(job):
                    go.wait()
                    return job, _complete(srv, job[0], PROMPTS[job[1]])

                with ThreadPoolExecutor(len(jobs)) as ex:
                    failures += [(j, r) for j, r in ex.map(run, jobs) if r != (200, want[j])]
                sizes = [b for _, b, _ in cache_usage(cache).entries.values()]
                biggest = max([biggest, *sizes])
        assert srv.get("/health").status_code == 200
        usage = cache_usage(cache)
        total, bases = usage.total, sum(usage.bases.values())
        # An operator removes every entry, and an adapter's source as well.
        for e in cache.iterdir():
            if len(e.name) == 32:
                shutil.rmtree(e)
        shutil.move(str(store / "p_0"), str(tmp_path / "p_0.gone"))
        again = [(n, _complete(srv, n, PROMPTS[0])) for n in names]
        bad_again = [(n, r) for n, r in again if n != "p_0" and r != (200, want[(n, 0)])]
        gone = dict(again)["p_0"]
        assert srv.get("/health").status_code == 200, srv.tail()
        assert _complete(srv, names[1], PROMPTS[1]) == (200, want[(names[1], 1)])
    FIGURES.update(bound_bytes=bound, bound_adapters=len(names), bound_requests=2 * len(names),
                   bound_failures=len(failures), bound_cache_bytes_after=total)
    assert not failures, failures[:5]
    assert total <= bound + 6 * biggest + bases, (total, bound, biggest, bases)
    assert not bad_again, bad_again[:4]
    assert gone != (200, want[("p_0", 0)])  # it fails (or is not found), alone


def _mounted_tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {p.stderr.strip()[:200]}")
    return path


@pytest.mark.server
def test_unwritable_cache_refuses_to_start_in_one_line(base_dir, tmp_path):
    ro = _mounted_tmpfs(tmp_path / "ro", "1m")
    try:
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        p = subprocess.run([sys.executable, "-m", NORA_ENTRY, str(base_dir), "--enable-nora",
                            "--nora-cache-dir", str(ro / "cache")],
                           capture_output=True, text=True, timeout=300)
        err = [ln for ln in p.stderr.splitlines() if ln.startswith("nora-serve:")]
        assert p.returncode == 1, p.stderr[-2000:]
        assert len(err) == 1 and "Read-only file system" in err[0] and str(ro / "cache") in err[0], err
        assert "Traceback" not in p.stderr, p.stderr[-2000:]
        # Asked for, it falls back to a temporary directory instead.
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
        from vllm.utils.argparse_utils import FlexibleArgumentParser

        from nora_serve.vllm_plugin.engine_args import apply_nora_cli_args

        args = make_arg_parser(FlexibleArgumentParser()).parse_args(
            ["--model", str(base_dir), "--enable-nora", "--nora-cache-dir", str(ro / "cache"), "--nora-cache-fallback"])
        settings = apply_nora_cli_args(AsyncEngineArgs(model=str(base_dir)), args)
        assert settings.cache_dir and not settings.cache_dir.startswith(str(ro)), settings.cache_dir
        shutil.rmtree(settings.cache_dir, ignore_errors=True)
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True)


@pytest.mark.server
def test_full_or_read_only_cache_is_a_server_fault(base_dir, tmp_path):
    """A full cache disk, then a read-only one: the adapter request is a one-line 503 counted as
    ``server_error`` (not a 400 blamed on the adapter), and the base and loaded adapters still
    answer."""
    store, names = _store_of(base_dir, tmp_path, n_lora=1)
    disk = _mounted_tmpfs(tmp_path / "disk", "64k")  # room for the start, not for a conversion
    try:
        with _nora_server(base_dir, store, disk / "cache", "--max-loras", "2", "--max-cpu-loras", "2") as srv:
            base = _complete(srv, str(base_dir), PROMPTS[0])
            assert base[0] == 200
            answers = {}
            for name in ("n_nora", "n_lora"):
                r = srv.post("/v1/completions", {"model": name, "prompt": PROMPTS[0], "max_tokens": 2})
                answers[name] = (r.status_code, r.json()["error"]["message"])
            subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
            r = srv.post("/v1/completions", {"model": "p_0", "prompt": PROMPTS[0], "max_tokens": 2})
            answers["p_0"] = (r.status_code, r.json()["error"]["message"])
            assert _complete(srv, str(base_dir), PROMPTS[0]) == base
            assert srv.get("/health").status_code == 200
            m = srv.metrics("nora:adapter_refusals_total")
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
    for name, (code, msg) in answers.items():
        assert code == 503, (name, code, msg)
        assert "\n" not in msg.strip() and str(disk) not in msg, msg
    assert "No space left" in answers["n_nora"][1] or "No space left" in answers["n_lora"][1], answers
    assert "Read-only" in answers["p_0"][1], answers
    assert m['nora:adapter_refusals_total{reason="server_error"}'] == 3, m
    assert m['nora:adapter_refusals_total{reason="invalid"}'] == 0, m
    FIGURES.update(full_disk_answers=sorted({c for c, _ in answers.values()}))


@pytest.fixture(scope="module")
def env(base_dir, fixtures_dir, tmp_path_factory):
    from nora_serve.tiny import make_tiny_llama
    from nora_serve.serving.cache.build import prepare_adapter
    from nora_serve.serving.cache.keys import ADAPTER_SUBDIR, MARKER
    from nora_serve.serving.cache.trust import entry_digest, read_marker

    root = tmp_path_factory.mktemp("reliability")
    store, cache, outside = root / "store", root / "cache", root / "outside"
    store.mkdir()
    native = make_native_adapters(base_dir, root / "native", seed=7)
    adapters = {f"n_{m}": p for m, p in native.items()}
    adapters["f_slora"] = fixtures_dir / "slora"
    adapters["f_adalora"] = fixtures_dir / "peft_adalora"
    for name, p in adapters.items():
        shutil.copytree(p, store / name)
    # Hostile content.
    _peft_lora(outside / "escaped", base_dir, 20)
    os.symlink(outside / "escaped", store / "escape")
    sneaky = _peft_lora(store / "sneaky", base_dir, 21)
    (sneaky / "adapter_model.safetensors").unlink()
    os.symlink(outside / "escaped" / "adapter_model.safetensors", sneaky / "adapter_model.safetensors")
    forged = _peft_lora(store / ADAPTER_SUBDIR, base_dir, 22)  # store/adapter + store/nora-cache.json
    t = load_file(str(forged / "adapter_model.safetensors"))
    next(iter(t.values()))[0, 0] = float("nan")
    save_file(t, str(forged / "adapter_model.safetensors"))
    (store / MARKER).write_text("{}")
    _peft_lora(store / "neg_alpha", base_dir, 23, alpha=-8.0)
    # A core-only adapter whose basis file is in no place it is looked for.
    no_basis = store / "no_basis"
    shutil.copytree(adapters["n_nora"], no_basis)
    cfg = json.loads((no_basis / "adapter_config.json").read_text())
    flat = load_file(str(no_basis / "adapter_model.safetensors"))
    save_file({k: v for k, v in flat.items() if not k.endswith((".outer_A", ".outer_B"))},
              str(no_basis / "adapter_model.safetensors"))
    cfg["format_version"] = 2
    cfg["shared_basis"] = {**(cfg.get("shared_basis") or {}), "digest": "0123456789abcdef0123456789abcdef"}
    (no_basis / "adapter_config.json").write_text(json.dumps(cfg))
    other = make_tiny_llama(root / "other_base", seed=123)
    _peft_lora(store / "other_base_lora", other, 24, base_name=str(other))
    # An entry with NaN weights that got past validation (written into the cache itself and
    # sealed with its digest): the defence in depth of the forward path.
    _peft_lora(store / "nanx", base_dir, 25)
    entry = Path(prepare_adapter(store / "nanx", base=base_dir, max_rank=MAX_RANK, cache_dir=cache).path).parent
    f = entry / ADAPTER_SUBDIR / "adapter_model.safetensors"
    t = load_file(str(f))
    t = {k: (torch.full_like(v, float("nan")) if ".layers.0.self_attn.q_proj.lora_A" in k else v) for k, v in t.items()}
    save_file(t, str(f))
    meta = read_marker(entry)
    meta["digest"] = entry_digest(entry)
    (entry / MARKER).write_text(json.dumps(meta))
    # kill -9 in the middle of a conversion into the server's cache, before it starts.
    _peft_lora(store / "killed", base_dir, 26)
    left = _kill_mid_conversion(store / "killed", base_dir, cache)
    assert left, "the kill did not happen mid-conversion"
    srv = VLLMServer(base_dir, ["--enable-nora", "--nora-adapter-dir", str(store), "--nora-cache-dir", str(cache),
                                "--max-loras", "2", "--max-cpu-loras", "2", "--max-lora-rank", str(MAX_RANK)],
                     entry="nora_serve.cli.serve", env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "0"})
    with srv:
        yield {"srv": srv, "store": store, "cache": cache, "outside": outside, "names": sorted(adapters),
               "base": str(base_dir), "left": left}
    if FIGURES:
        print("\nreliability figures:", json.dumps(FIGURES))


def _complete(srv, model, prompt, n=N_TOKENS):
    r = srv.post("/v1/completions", {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0,
                                     "ignore_eos": True, "return_tokens_as_token_ids": True, "logprobs": 1})
    if r.status_code != 200:
        return r.status_code, r.text
    toks = r.json()["choices"][0]["logprobs"]["tokens"]
    return 200, [int(t.split(":", 1)[1]) for t in toks]


@pytest.fixture(scope="module")
def alone(env):
    """Each adapter (and the base) served alone, one request at a time."""
    srv, out = env["srv"], {}
    for model in [env["base"], *env["names"]]:
        for i, p in enumerate(PROMPTS):
            code, toks = _complete(srv, model, p)
            assert code == 200, (model, toks)
            out[(model, i)] = toks
    # The adapters do change the answers (else equality would prove nothing).
    assert len({tuple(v) for (m, i), v in out.items() if i == 0}) >= 6
    return out


@pytest.mark.server
def test_stale_temporaries_removed_at_start(env, alone):
    assert not [n.name for n in env["cache"].iterdir() if ".tmp-" in n.name], env["left"]
    code, toks = _complete(env["srv"], "killed", PROMPTS[0])
    assert code == 200, toks


@pytest.mark.server
def test_adapter_churn_at_max_loras_2(env, alone):
    """4 threads x 50 completions round-robin over 8 adapters and the base, several rounds:
    every answer equals the adapter served alone, the engine stays up."""
    srv = env["srv"]
    models = [env["base"], *env["names"]]
    jobs = [(models[(t + k) % len(models)], (t + k) % len(PROMPTS)) for t in range(CHURN_THREADS)
            for k in range(CHURN_PER_THREAD)]
    failures, t0 = [], time.monotonic()
    for _ in range(CHURN_ROUNDS):
        with ThreadPoolExecutor(CHURN_THREADS) as ex:
            results = list(ex.map(lambda j: (j, _complete(srv, j[0], PROMPTS[j[1]])), jobs))
        failures += [(j, r) for j, r in results if r != (200, alone[j])]
    FIGURES.update(churn_requests=len(jobs) * CHURN_ROUNDS, churn_rounds=CHURN_ROUNDS,
                   churn_adapters=len(env["names"]), churn_failures=len(failures),
                   churn_seconds=round(time.monotonic() - t0, 1))
    assert not failures, failures[:5]
    assert srv.get("/health").status_code == 200
    log = srv.log.read_text(errors="replace")
    assert "StorageFull" not in log and "EngineDeadError" not in log


@pytest.mark.parametrize("name,code,words", [
    ("adapter", 400, "nan"),  # a directory with nora-cache.json beside it: checked like any other
    ("neg_alpha", 400, "lora_alpha"),
    ("no_basis", 400, "shared basis"),  # a format_version 2 adapter whose basis is not there
    ("other_base_lora", 400, "another base"),
    ("escape", 404, "does not exist"),  # symlink out of the store
    ("sneaky", 404, "does not exist"),  # a weight file symlinked out of the store
    ("a" * 300, 404, "does not exist"),
    ("..", 404, "does not exist"),
    (".hidden", 404, "does not exist"),
    ("a b", 404, "does not exist"),
    ("n_lora/../n_slora", 404, "does not exist"),
    ("%2e%2e", 404, "does not exist"),
])
@pytest.mark.server
def test_hostile_model_names_and_store_content(env, alone, name, code, words):
    srv = env["srv"]
    r = srv.post("/v1/completions", {"model": name, "prompt": PROMPTS[0], "max_tokens": 2})
    assert r.status_code == code, (name[:40], r.status_code, r.text[:300])
    msg = r.json()["error"]["message"]
    assert words in msg.lower() and "\n" not in msg.strip(), msg
    assert str(env["outside"]) not in msg and str(env["store"]) not in msg, msg
    if name == "no_basis":
        assert "0123456789abcdef0123456789abcdef" in msg and name in msg, msg
    # The server keeps answering, the base exactly as before.
    assert _complete(srv, env["base"], PROMPTS[0]) == (200, alone[(env["base"], 0)])


@pytest.mark.server
def test_runtime_loading_closed_by_default(env, alone):
    srv = env["srv"]
    r = srv.post("/v1/load_lora_adapter", {"lora_name": "by_path", "lora_path": str(env["outside"] / "escaped")})
    assert r.status_code == 404, r.text
    assert "by_path" not in {m["id"] for m in srv.get("/v1/models").json()["data"]}
    assert srv.post("/v1/completions", {"model": "by_path", "prompt": [1, 2], "max_tokens": 1}).status_code == 404


@pytest.mark.server
def test_nan_adapter_in_a_mixed_batch_leaves_others_unchanged(env, alone):
    """``nanx`` carries NaN weights that got past validation. Sent at once with the base and
    another adapter, the others' tokens stay exactly those they get alone."""
    srv, base = env["srv"], env["base"]
    others = [(base, 0), (base, 1), ("n_lora", 0), ("n_lora", 1)]
    bad = []
    for _ in range(3):
        go = threading.Barrier(len(others) + 1)

        def run(job):
            go.wait()
            return job, _complete(srv, job[0], PROMPTS[job[1]])

        with ThreadPoolExecutor(len(others) + 1) as ex:
            results = list(ex.map(run, [("nanx", 0)] + others))
        bad += [(j, r) for j, r in results[1:] if r != (200, alone[j])]
        assert srv.get("/health").status_code == 200, "the NaN adapter killed the engine"
    # The sealed NaN entry was served as it is (not converted again from the clean source).
    log = srv.log.read_text(errors="replace")
    assert "resolved adapter 'nanx'" in log and "store/nanx ->" not in log
    FIGURES.update(nan_rounds=3, nan_other_requests=3 * len(others), nan_failures=len(bad),
                   nan_own_answer=str(results[0][1])[:80])
    assert not bad, bad[:4]



@pytest.mark.server
def test_models_list_no_server_paths(env, alone):
    data = env["srv"].get("/v1/models").json()["data"]
    roots = {m["id"]: m["root"] for m in data}
    assert set(env["names"]) <= set(roots), roots
    for name in env["names"]:
        assert roots[name] == name and not os.path.isabs(roots[name]), (name, roots[name])
    # The base model's root is its served name (here the path it was started with), nothing more.
    assert roots[env["base"]] == env["base"], roots


@pytest.mark.server
def test_metric_series_do_not_grow_with_adapters(env, alone):
    """vLLM's ``vllm:lora_requests_info`` takes the running adapters' names as a label value (a
    series per combination); with nora on it is not set, and the nora series are a fixed set."""
    m = env["srv"].metrics()
    names = [k for k in m if "lora" in k.split("{")[0]]
    assert not [k for k in names if k.startswith("vllm:lora_requests_info")], names
    assert not [k for k in m if any(f'"{n}' in k or f",{n}" in k for n in env["names"])], "a series names an adapter"
    series = [k for k in m if k.startswith("nora:")]
    FIGURES.update(metric_series_nora=len(series), metric_series_lora_info=0)
    # A fixed set: this many whatever the number of adapters seen (8 here, thousands elsewhere).
    assert len(series) <= 40, series


@pytest.mark.server
def test_store_name_with_trailing_newline_is_not_found(env, alone):
    r = env["srv"].post("/v1/completions", {"model": env["names"][0] + "\n", "prompt": PROMPTS[0], "max_tokens": 2})
    assert r.status_code == 404, r.text
