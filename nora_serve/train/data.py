"""Training data: JSONL with ``text`` or ``prompt``/``completion`` records, tokenised once.

``text`` records train on every token; ``prompt``/``completion`` records only on the
completion (the prompt's labels are masked out). Errors name the file and line at fault.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE = -100


class DataError(ValueError):
    """Bad training data; the message names the file and line."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken
    line: int


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """``[(line number, record)]`` for each non-blank line; :class:`DataError` on bad lines."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    out = []
    with path.open(encoding="utf-8") as fh:
        for n, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
            has_text = "text" in rec
            has_pair = "prompt" in rec or "completion" in rec
            if has_text and has_pair:
                raise DataError(f"{path}:{n}: has both 'text' and 'prompt'/'completion'; use one form")
            if has_text:
                fields = ("text",)
            elif "prompt" in rec and "completion" in rec:
                fields = ("prompt", "completion")
            elif has_pair:
                missing = "completion" if "prompt" in rec else "prompt"
                raise DataError(f"{path}:{n}: has {'prompt' if missing == 'completion' else 'completion'!r} but no {missing!r}")
            else:
                raise DataError(
                    f"{path}:{n}: needs a 'text' field or 'prompt' and 'completion' fields "
                    f"(found: {', '.join(sorted(rec)) or 'none'})"
                )
            for f in fields:
                if not isinstance(rec[f], str):
                    raise DataError(f"{path}:{n}: field {f!r} must be a string, got {type(rec[f]).__name__}")
            out.append((n, rec))
    if not out:
        raise DataError(f"{path}: no records")
    return out


def _encode_pair(tokenizer, prompt: str, completion: str) -> tuple[list[int], int]:
    """Token ids of ``prompt + completion`` and how many leading tokens belong to the prompt.

    Tokenising the joined string (not the two halves apart) gives the ids the model sees at
    inference; a token that straddles the boundary counts as completion.
    """
    full = prompt + completion
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(full, add_special_tokens=True, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        n_prompt = 0  # leading tokens that end inside the prompt (specials are (0, 0))
        for _, e in offsets:
            if e > len(prompt):
                break
            n_prompt += 1
        return list(ids), n_prompt
    p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return list(p) + list(c), len(p)


def encode_records(records, tokenizer, max_length: int, source: str = "data") -> list[Example]:
    """Tokenise records; append EOS so the model learns to stop; truncate to ``max_length``.

    Records whose completion is cut away entirely are dropped (nothing to learn from them)."""
    eos = tokenizer.eos_token_id
    out = []
    for n, rec in records:
        if "text" in rec:
            ids = list(tokenizer(rec["text"], add_special_tokens=True)["input_ids"])
            n_prompt = 0
        else:
            ids, n_prompt = _encode_pair(tokenizer, rec["prompt"], rec["completion"])
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        ids = ids[:max_length]
        labels = [IGNORE] * min(n_prompt, len(ids)) + ids[n_prompt:]
        # The first token has no prediction (nothing before it); it needs a second token.
        if len(ids) < 2 or all(lab == IGNORE for lab in labels[1:]):
            continue
        out.append(Example(ids, labels, n))
    if not out:
        raise DataError(f"{source}: no record has a token to train on within --max-length {max_length}")
    return out


def load_examples(path: str | Path, tokenizer, max_length: int) -> list[Example]:
    return encode_records(read_jsonl(path), tokenizer, max_length, source=str(path))


def collate(batch: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (IGNORE on padding)."""
    L = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), L), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), L), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), L), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled tokens (float32)."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    return torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=IGNORE
    )
