"""``nora-train``: train a LoRA-family adapter and save it in nora-serve's native format."""

from __future__ import annotations

import argparse
import sys

from nora_serve.train.inject import LLAMA_TARGETS, METHODS

EPILOG = """\
data: JSONL, one object per line, either {"text": "..."} (loss on every token) or
{"prompt": "...", "completion": "..."} (loss on the completion only).

output: DIR/adapter_config.json and DIR/adapter_model.safetensors (native format),
DIR/train_log.json (loss per step) and DIR/loss.png.

methods:
  lora     dW = s B A, s = alpha/r
  nora     dW = s B_o (B_i A_i) A_o: outer pair from the SVD of W0 (frozen, shared),
           inner pair [r x r'] trained; s = alpha/r'
  slora    dW = s B N A, A and N random, B = 0; s = alpha/r
  nlora    the same with the Nystrom init A = W0[:r], N = W0[:r,:r], B = W0[:,:r]
  inttune  nlora's init with A and B frozen: only the r x r core N trains
  dyrank   dynamic-rank DoRA: starts at ceil(1.5 r) components per module, prunes to
           an average of r on a cubic schedule; s = alpha/ceil(1.5 r)
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nora-train",
        description="Train an adapter on a Hugging Face causal LM (CPU, or the GPU when there is one).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="base model: a local directory or a cached Hub name")
    p.add_argument("--data", required=True, help="training data, JSONL (see below)")
    p.add_argument("--method", required=True, choices=METHODS, help="adapter method (see below)")
    p.add_argument("--out", required=True, help="output directory (written all or nothing)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    g = p.add_argument_group("adapter")
    g.add_argument("--rank", type=int, default=8,
                   help="rank r (NoRA: the outer rank; dyrank: the target average rank) [8]")
    g.add_argument("--inner-rank", type=int, default=None,
                   help="NoRA only: inner rank r' < rank [rank // 2]")
    g.add_argument("--alpha", type=float, default=16.0, help="scale numerator alpha (see the scale per method) [16]")
    g.add_argument("--targets", default=",".join(LLAMA_TARGETS),
                   help="comma-separated module-name suffixes of the nn.Linear layers to adapt "
                        "[%(default)s]")
    g.add_argument("--dropout", type=float, default=0.0, help="dropout on the adapter input [0]")
    g.add_argument("--rslora", action="store_true", help="lora only: scale alpha/sqrt(r)")
    g.add_argument("--calibration", type=int, default=0, metavar="N",
                   help="NoRA only: activation-aware SVD from the first N training examples "
                        "(0: plain SVD of W0) [0]")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate [2e-4]")
    g.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    g.add_argument("--epochs", type=float, default=None, help="passes over the data when --max-steps is unset [1]")
    g.add_argument("--batch-size", type=int, default=8, help="sequences per step [8]")
    g.add_argument("--max-length", type=int, default=512, help="truncate sequences to this many tokens [512]")
    g.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warmup steps [0]")
    g.add_argument("--schedule", choices=("constant", "linear", "cosine"), default="linear",
                   help="learning-rate decay after warmup [linear]")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay [0]")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm, 0 to disable [1.0]")
    g.add_argument("--seed", type=int, default=0, help="seed for the init and the data order [0]")
    g = p.add_argument_group("dyrank (dynamic-rank DoRA)")
    g.add_argument("--dyrank-warmup-ratio", type=float, default=0.15,
                   help="fraction of steps before pruning starts [0.15]")
    g.add_argument("--dyrank-final-ratio", type=float, default=0.5,
                   help="fraction of steps at the end trained with the final ranks fixed [0.5]")
    g.add_argument("--dyrank-interval", type=int, default=None,
                   help="steps between prunings [a tenth of the pruning phase]")
    g.add_argument("--dyrank-beta", type=float, default=0.9, help="EMA factor of the importance scores [0.9]")
    g.add_argument("--dyrank-reg", type=float, default=0.1,
                   help="weight of the component-variance regulariser while pruning [0.1]")
    g = p.add_argument_group("runtime")
    g.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="base model dtype; adapter weights stay float32 [auto: float32 on CPU, bfloat16 on GPU]")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... [auto: cuda when available]")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from nora_serve.train import DataError, TrainConfig, train

    cfg = TrainConfig(
        model=args.model, data=args.data, method=args.method, out=args.out, overwrite=args.overwrite,
        rank=args.rank, inner_rank=args.inner_rank, alpha=args.alpha,
        targets=tuple(t for t in args.targets.split(",") if t.strip()), dropout=args.dropout,
        use_rslora=args.rslora, calibration=args.calibration, lr=args.lr, max_steps=args.max_steps,
        epochs=args.epochs, batch_size=args.batch_size, max_length=args.max_length,
        warmup_steps=args.warmup_steps, schedule=args.schedule, weight_decay=args.weight_decay,
        grad_clip=args.grad_clip, seed=args.seed, dyrank_warmup_ratio=args.dyrank_warmup_ratio,
        dyrank_final_ratio=args.dyrank_final_ratio, dyrank_interval=args.dyrank_interval,
        dyrank_beta=args.dyrank_beta, dyrank_reg=args.dyrank_reg, dtype=args.dtype, device=args.device,
        progress=not args.no_progress,
    )
    try:
        res = train(cfg)
    except (DataError, ValueError, OSError) as e:  # OSError: a missing model or data path
        print(f"nora-train: error: {e}", file=sys.stderr)
        return 2
    log = res.log
    print(
        f"saved {cfg.method} adapter to {res.out}: {log['modules']} modules, "
        f"{log['trainable_params']:,} trainable parameters, loss {log['loss'][0]:.4f} -> {log['loss'][-1]:.4f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
