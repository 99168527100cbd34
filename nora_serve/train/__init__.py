"""The trainer behind ``nora-train``: every registered method with a trainer init (LoRA, NoRA,
SLoRA/NLoRA/IntTune, dynamic-rank DoRA, LoRA-XS, PEFT DoRA) on any Hugging Face causal LM, saved
in the native format (PEFT DoRA: in PEFT's).

    from nora_serve.train import TrainConfig, train
    result = train(TrainConfig(model="base/", data="train.jsonl", method="nora", out="adapter/"))
"""

from .data import DataError, Example, load_examples, read_jsonl
from .inject import LLAMA_TARGETS, METHODS, find_targets, inject
from .layers import AdapterLinear, MethodLinear
from .trainer import TrainConfig, TrainResult, count_trainable, prepare, train

__all__ = [
    "TrainConfig",
    "TrainResult",
    "train",
    "prepare",
    "count_trainable",
    "DataError",
    "Example",
    "load_examples",
    "read_jsonl",
    "LLAMA_TARGETS",
    "METHODS",
    "find_targets",
    "inject",
    "AdapterLinear",
    "MethodLinear",
]
