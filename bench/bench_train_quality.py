"""A small, honest quality check of nora-train's methods on a task a random base cannot do.

Task: reverse a sequence of words (``"tree cat sun :"`` -> ``"sun cat tree"``), on a tiny
random-weight Llama. Train and held-out sets are disjoint word sequences over the same words.
Each method trains for the same number of steps, batch and data order; its learning rate is
the best of a small grid (picked on a validation split, reported on the held-out test split).

Printed per method, side by side with LoRA (ratio = method / LoRA):
  exact match and token accuracy on held-out sequences (teacher-forced argmax, which equals
  greedy decoding's exact match), trainable parameters, median time per training step
  (measured after training, the methods taking turns step by step so that a busy machine
  slows them alike), and training
  memory, counted from tensors: the activations saved for backward in one step (distinct
  storages) plus the adapter's parameters, frozen buffers, gradients and AdamW state. The
  base weights, the same for every method, are left out.

    python bench/bench_train_quality.py            # ~ a few minutes on 2 CPU cores
    python bench/bench_train_quality.py --quick    # one learning rate per method
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from nora_serve.tiny import make_tiny_llama, tiny_vocab
from nora_serve.train import TrainConfig, load_examples, train
from nora_serve.train.data import IGNORE, collate

METHODS = ("lora", "nora", "slora", "nlora", "inttune", "dyrank")
# Learning-rate grids: the methods whose only trainable part is a small core between frozen
# factors (NoRA's inner pair, IntTune's N) need much larger steps to move at all.
GRID = {
    "lora": (1e-3, 3e-3, 1e-2),
    "nora": (1e-2, 3e-2, 1e-1),
    "slora": (1e-3, 3e-3, 1e-2),
    "nlora": (1e-3, 3e-3, 1e-2),
    "inttune": (1e-1, 3e-1, 1.0),
    "dyrank": (1e-3, 3e-3, 1e-2),
}
QUICK = {"lora": 3e-3, "nora": 3e-2, "slora": 3e-3, "nlora": 3e-3, "inttune": 3e-1, "dyrank": 3e-3}


def make_task(d: Path, n_words: int, length: int, n_train: int, n_val: int, n_test: int, seed: int):
    words = [w for w in tiny_vocab(128) if not w.startswith("<")][:n_words]
    seqs = list(itertools.permutations(words, length))
    random.Random(seed).shuffle(seqs)
    need = n_train + n_val + n_test
    if len(seqs) < need:
        raise SystemExit(f"only {len(seqs)} distinct sequences; ask for fewer examples")
    splits = {"train": seqs[:n_train], "val": seqs[n_train:n_train + n_val], "test": seqs[n_train + n_val:need]}
    paths = {}
    for name, ss in splits.items():
        paths[name] = d / f"{name}.jsonl"
        with paths[name].open("w") as f:
            for s in ss:
                f.write(json.dumps({"prompt": " ".join(s) + " :", "completion": " " + " ".join(reversed(s))}) + "\n")
    return paths


@torch.no_grad()
def accuracy(model, examples, pad: int, batch: int = 256) -> tuple[float, float]:
    """(exact match, token accuracy) of the completion under teacher forcing."""
    exact = tokens = correct = n = 0
    for i in range(0, len(examples), batch):
        b = collate(examples[i:i + batch], pad)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        pred = logits[:, :-1].argmax(-1)
        lab = b["labels"][:, 1:]
        mask = lab != IGNORE
        ok = (pred == lab) | ~mask
        exact += int(ok.all(dim=1).sum())
        correct += int(((pred == lab) & mask).sum())
        tokens += int(mask.sum())
        n += lab.shape[0]
    return exact / n, correct / tokens


def train_memory_bytes(model, layers, examples, pad: int, batch_size: int) -> int:
    """Bytes of one training step's state, counted from tensors (see the module docstring)."""
    storages: dict[int, int] = {}

    def pack(t):
        if t.device.type == "cpu" or t.is_cuda:
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
        return t

    base_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters() if not p.requires_grad}
    model.train()
    b = collate(examples[:batch_size], pad)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), b["labels"][:, 1:].reshape(-1), ignore_index=IGNORE)
    loss.backward()
    model.eval()
    # Saved tensors that are base weights are not activations (they exist anyway).
    act = sum(v for k, v in storages.items() if k not in base_ptrs)
    adapter = 0
    for layer in layers.values():
        for p in layer.parameters():
            if p.requires_grad:
                adapter += p.numel() * p.element_size() * 4  # param, grad, AdamW exp_avg, exp_avg_sq
                p.grad = None
        adapter += sum(t.numel() * t.element_size() for n, t in layer.named_buffers(recurse=False))
    return act + adapter


def make_step(res, batch, dyrank_reg: float):
    """One training step as the trainer runs it (forward, loss, backward, AdamW, and for
    dyrank the importance update and the regulariser), on a fixed batch."""
    from nora_serve.train.data import causal_lm_loss
    from nora_serve.methods.dyrank import DyRankPruner

    params = [p for layer in res.layers.values() for p in layer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-9)  # timing only: the weights barely move
    pruner = DyRankPruner(res.layers, 10**9, 1) if res.log["method"] == "dyrank" else None

    def step():
        res.model.train()
        logits = res.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = causal_lm_loss(logits, batch["labels"])
        if pruner is not None:
            loss = loss + dyrank_reg * pruner.regularizer()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if pruner is not None:
            pruner.update_scores()
        res.model.eval()

    return step


def interleaved_step_times(steps: dict, rounds: int) -> dict[str, float]:
    """Median seconds per step, the methods taking turns so that they share whatever load
    the machine has in the same way."""
    times = {m: [] for m in steps}
    for m, f in steps.items():  # warm up
        f()
    for _ in range(rounds):
        for m, f in steps.items():
            t0 = time.perf_counter()
            f()
            times[m].append(time.perf_counter() - t0)
    return {m: statistics.median(v) for m, v in times.items()}


def run(method: str, lr: float, paths, args, rank_kw) -> dict:
    cfg = TrainConfig(
        model=str(args.base), data=str(paths["train"]), method=method, out=None, lr=lr,
        max_steps=args.steps, batch_size=args.batch_size, max_length=32, seed=args.seed,
        schedule="linear", warmup_steps=args.steps // 20, alpha=2.0 * rank_kw["rank"], device="cpu",
        progress=False, **({"rank": rank_kw["nora_rank"], "inner_rank": rank_kw["nora_inner"]}
                           if method == "nora" else {"rank": rank_kw["rank"]}),
    )
    res = train(cfg)
    tok = res.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    val = load_examples(paths["val"], tok, 32)
    test = load_examples(paths["test"], tok, 32)
    val_exact, val_tok = accuracy(res.model, val, pad)
    exact, tok_acc = accuracy(res.model, test, pad)
    train_ex = load_examples(paths["train"], tok, 32)
    mem = train_memory_bytes(res.model, res.layers, train_ex, pad, args.batch_size)
    return {
        "method": method, "lr": lr, "val_exact": val_exact, "val_tok": val_tok, "exact": exact,
        "tok_acc": tok_acc, "params": res.log["trainable_params"],
        "mem_mib": mem / 2**20, "final_loss": statistics.fmean(res.log["loss"][-10:]),
        "rank_pattern": res.adapter.config.get("rank_pattern"), "res": res,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rank", type=int, default=8, help="rank of lora/slora/nlora/inttune, dyrank's target [8]")
    ap.add_argument("--nora-rank", type=int, default=16, help="NoRA outer rank [16]")
    ap.add_argument("--nora-inner", type=int, default=8, help="NoRA inner rank [8]")
    ap.add_argument("--words", type=int, default=20)
    ap.add_argument("--length", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timing-rounds", type=int, default=40)
    ap.add_argument("--quick", action="store_true", help="one learning rate per method, no grid")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    if "lora" not in methods:
        methods.insert(0, "lora")

    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    args.base = make_tiny_llama(tmp / "base", hidden_size=128, intermediate_size=256, num_layers=2,
                                num_heads=4, num_kv_heads=2, head_dim=32, seed=args.seed)
    paths = make_task(tmp, args.words, args.length, n_train=2000, n_val=200, n_test=500, seed=args.seed)
    rank_kw = {"rank": args.rank, "nora_rank": args.nora_rank, "nora_inner": args.nora_inner}

    # The base alone, for reference: it cannot do the task.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.base)
    base = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32).eval()
    base_exact, base_tok = accuracy(base, load_examples(paths["test"], tok, 32), tok.eos_token_id)
    del base

    t0 = time.perf_counter()
    results = {}
    for m in methods:
        grid = (QUICK[m],) if args.quick else GRID[m]
        runs = []
        for lr in grid:
            r = run(m, lr, paths, args, rank_kw)
            print(f"  {m:8s} lr={lr:<7g} val exact {r['val_exact']:.3f}  test exact {r['exact']:.3f}  "
                  f"loss {r['final_loss']:.3f}", file=sys.stderr, flush=True)
            runs.append(r)
        results[m] = max(runs, key=lambda r: (r["val_exact"], r["val_tok"]))
        for r in runs:
            if r is not results[m]:
                del r["res"]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    batch = collate(load_examples(paths["train"], tok, 32)[: args.batch_size], pad)
    ms = interleaved_step_times({m: make_step(results[m]["res"], batch, 0.1) for m in methods}, args.timing_rounds)
    for m in methods:
        results[m]["step_ms"] = 1000 * ms[m]
        del results[m]["res"]
    wall = time.perf_counter() - t0

    lo = results["lora"]
    print(f"machine: {platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, CUDA {'yes' if torch.cuda.is_available() else 'no'}")
    print(f"task: reverse {args.length} of {args.words} words; 2000 train / 200 val / 500 test sequences "
          f"(disjoint); base: tiny Llama hidden 128, 2 layers, random weights; all 7 projections")
    print(f"{args.steps} steps x batch {args.batch_size}, linear decay, lr best of {'1' if args.quick else '3'} "
          f"on val; rank {args.rank} (NoRA {args.nora_rank}/{args.nora_inner}, dyrank "
          f"{math.ceil(1.5 * args.rank)} -> avg {args.rank}); base model alone: exact {base_exact:.3f}, "
          f"token acc {base_tok:.3f}")
    hdr = (f"{'method':8s} {'lr':>6s} {'exact':>6s} {'tok acc':>7s} {'params':>8s} {'x LoRA':>7s} "
           f"{'ms/step':>8s} {'x LoRA':>7s} {'mem MiB':>8s} {'x LoRA':>7s}")
    print(hdr)
    print("-" * len(hdr))
    for m in methods:
        r = results[m]
        print(f"{m:8s} {r['lr']:>6g} {r['exact']:>6.3f} {r['tok_acc']:>7.3f} {r['params']:>8,d} "
              f"{r['params'] / lo['params']:>7.3f} {r['step_ms']:>8.1f} {r['step_ms'] / lo['step_ms']:>7.2f} "
              f"{r['mem_mib']:>8.2f} {r['mem_mib'] / lo['mem_mib']:>7.3f}")
    print(f"(wall time {wall:.0f} s for {sum(len((QUICK[m],) if args.quick else GRID[m]) for m in methods)} "
          f"training runs)")
    if results.get("dyrank", {}).get("rank_pattern"):
        ranks = sorted(results["dyrank"]["rank_pattern"].values())
        print(f"dyrank ranks per module after pruning: min {ranks[0]}, max {ranks[-1]}, mean "
              f"{statistics.fmean(ranks):.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "args": {k: str(v) for k, v in vars(args).items()}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
