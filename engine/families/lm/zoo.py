"""Named model sizes, built fresh from transformers configs each generation.

The paper's sizes (Gerstgrasser et al. 2024, §2) — parameter counts within 10% of their
names at the 8192-token vocabulary of studies/tinystories_paper.yaml — plus small sizes
a CPU trains in seconds.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSize:
    name: str
    arch: str  # "gpt2" or "llama"
    width: int
    depth: int
    heads: int
    ffn: int = 0  # llama's MLP width (gpt2 uses 4·width)
    note: str = ""


ZOO = {m.name: m for m in [
    ModelSize("tiny", "gpt2", 64, 2, 2, note="CPU tests"),
    ModelSize("small", "llama", 128, 3, 4, 384, note="CPU quickstart"),
    ModelSize("base", "llama", 256, 4, 4, 768, note="CPU, real TinyStories sample"),
    ModelSize("gpt2-9m", "gpt2", 256, 8, 8, note="paper"),
    ModelSize("llama2-12m", "llama", 288, 7, 6, 768, note="paper"),
    ModelSize("llama2-42m", "llama", 512, 11, 8, 1376, note="paper"),
    ModelSize("llama2-126m", "llama", 768, 16, 12, 2048, note="paper"),
]}


def config(size: ModelSize, vocab_size: int, context: int, bos: int, eos: int, pad: int):
    from transformers import GPT2Config, LlamaConfig

    if size.arch == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_positions=context, n_embd=size.width,
                          n_layer=size.depth, n_head=size.heads, bos_token_id=bos,
                          eos_token_id=eos, pad_token_id=pad, tie_word_embeddings=True)
    return LlamaConfig(vocab_size=vocab_size, hidden_size=size.width,
                       intermediate_size=size.ffn, num_hidden_layers=size.depth,
                       num_attention_heads=size.heads, num_key_value_heads=size.heads,
                       max_position_embeddings=context, bos_token_id=bos, eos_token_id=eos,
                       pad_token_id=pad, tie_word_embeddings=False)


def build(size: ModelSize, vocab_size: int, context: int, bos: int, eos: int, pad: int,
          seed: int):
    """A freshly initialised causal LM (seeded)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config(size, vocab_size, context, bos, eos, pad))


def parameter_count(size: ModelSize, vocab_size: int, context: int = 512) -> int:
    """Exact count of a built model's parameters (tied embeddings counted once)."""
    d, L, V = size.width, size.depth, vocab_size
    if size.arch == "gpt2":
        block = 4 * d * d + 4 * d + 2 * (4 * d * d) + 4 * d + d + 4 * d  # attn, mlp, biases, 2 LN
        return V * d + context * d + L * block + 2 * d
    block = 4 * d * d + 3 * d * size.ffn + 2 * d  # attn (no bias), gated MLP, 2 RMSNorm
    return 2 * V * d + L * block + d
