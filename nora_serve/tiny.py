"""A tiny random-weight Llama with a word-level tokenizer, made on the spot.

No model can be downloaded where the tests and the demo run, so they make their own. The
shape serves on vLLM's CPU backend (head_dim 32: CPU attention refuses 16).
"""

from __future__ import annotations

import json
from pathlib import Path

WORDS = (
    "the of and to a in is it you that he was for on are as with his they i at be this have "
    "from or one had by word but not what all were we when your can said there use an each "
    "which she do how their if will up other about out many then them these so some her would "
    "make like him into time has look two more write go see number no way could people my than "
    "first water been call who oil its now find long down day did get come made may part over "
    "new sound take only little work know place year live me back give most very after thing "
    "our just name good sentence man think say great where help through much before line right "
    "too mean old any same tell boy follow came want show also around form three small set put "
    "end does another well large must big even such because turn here why ask went men read "
    "need land different home us move try kind hand picture again change off play spell air "
    "away animal house point page letter mother answer found study still learn should america "
    "world red blue green cat dog sun moon star tree yes zero four five six seven eight nine ten"
).split()


def tiny_vocab(size: int) -> dict[str, int]:
    specials = ["<unk>", "<s>", "</s>"]
    words = list(dict.fromkeys(WORDS))
    # Past the word list, numbered filler words keep any vocab size possible.
    words += [f"w{i}" for i in range(max(0, size - len(specials) - len(words)))]
    words = words[: size - len(specials)]
    return {w: i for i, w in enumerate(specials + words)}


def make_tokenizer(vocab: dict[str, int]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def make_tiny_llama(
    out: str | Path,
    *,
    vocab_size: int = 128,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    head_dim: int = 32,
    seed: int = 0,
    init_std: float = 0.05,
) -> Path:
    """Write a random-weight ``LlamaForCausalLM`` (fp32, safetensors) and its tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out)
    vocab = tiny_vocab(vocab_size)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        initializer_range=init_std,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(torch.float32).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    make_tokenizer(vocab).save_pretrained(out)
    # vLLM reads the dtype from the config; keep it explicit.
    cfg_path = out / "config.json"
    data = json.loads(cfg_path.read_text())
    data["torch_dtype"] = "float32"
    cfg_path.write_text(json.dumps(data, indent=2) + "\n")
    return out
