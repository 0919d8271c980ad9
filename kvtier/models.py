"""Tiny random Llama models, for tests and demos that run without downloads.

``make_random_llama(path, size)`` writes ``config.json`` and ``model.safetensors``
for a Llama with random weights. Outputs are nonsense but deterministic, which is
all an equality test (outputs with kvtier == outputs without) needs. Weights use a
fairly large std so that different prompts give different greedy continuations
(with tiny weights every prompt collapses onto the same token and a test would
prove nothing).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

SIZES = {
    # ~0.4M params: starts in seconds, one chunk of 256 tokens is 512 KiB in float32.
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, vocab_size=1024, std=0.2),
    # ~82M params: large enough that recomputing a long prefix costs visibly more than loading it.
    "demo": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=4, head_dim=64, vocab_size=4096, std=0.05),
}


def kv_bytes_per_token(model_dir: str | os.PathLike, itemsize: int) -> int:
    """KV-cache bytes of one token of the Hugging Face model at ``model_dir`` (all layers, K and V)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * itemsize


def write_word_tokenizer(path: str | os.PathLike, vocab_size: int) -> None:
    """A tokenizer for the random models, so that servers taking text (``vllm serve``) can load them:
    token ``i`` (from 3) is the word ``w<i>``, 0-2 are ``<unk> <s> </s>`` (the models' bos 1 and eos 2);
    text is words separated by spaces (``w17 w4 w99``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(path))


def make_random_llama(path: str | os.PathLike, size: str = "tiny", seed: int = 0,
                      max_position_embeddings: int = 8192) -> str:
    """Write a random Llama of ``size`` ("tiny" or "demo") to ``path``; returns the path.

    Idempotent: an existing complete model directory of the same size and seed is reused.
    """
    if size not in SIZES:
        raise ValueError(f"size={size!r}: allowed {', '.join(SIZES)}")
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(path)
    marker = out / "kvtier_model.json"
    spec = dict(SIZES[size])
    std = spec.pop("std")
    stamp = {"size": size, "seed": seed, "max_position_embeddings": max_position_embeddings}
    if marker.exists() and (out / "model.safetensors").exists():
        try:
            if json.loads(marker.read_text()) == stamp:
                return str(out)
        except ValueError:
            pass
    out.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        **spec, max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, torch_dtype="float32",
        initializer_range=std,
    )
    config.architectures = ["LlamaForCausalLM"]
    gen = torch.Generator().manual_seed(seed)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config)
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("norm.weight") or "layernorm" in name:
            state[name] = torch.ones_like(tensor)
        else:
            state[name] = (torch.randn(tensor.shape, generator=gen) * std).to(torch.float32).contiguous()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(out))
    marker.write_text(json.dumps(stamp))
    return str(out)
