"""Each story's random draws, computed for a whole batch at once.

A story's token at position k (0 for the first token after its prompt) is drawn by
inverting the cumulative distribution it is sampled from (tempered, penalised, top-k /
top-p filtered) at one uniform number, u(seed, k): a pure function of the story's seed
and the position, from a counter-based integer hash. So a story is the same whatever
batch it lands in, whichever backend decodes it, and after any resume; and no random
generator object exists per story. (One generator per story makes the draws a loop over
the batch: vLLM draws each seeded request's noise one request at a time, and the hf
backend did the same row by row.)

Precision: the cumulative distribution is summed in float64 and u has 53 random bits,
so every token whose probability exceeds ~1e-16 is drawn with its own probability: the
tails that model collapse is about are not rounded away (a float32 Gumbel-max draw
loses tokens below ~1e-10; float32 inverse-CDF sampling, below ~1e-7).

The hash is lowbias32 (C. Wellons' hash prospector: constants 0x21f0aaad, 0x735a2d97),
a bijection of 32-bit integers with every output bit depending on every input bit,
computed in int64 with 16-bit halves of each constant so that no product overflows:
the same values in numpy and in torch, on any device.
"""
from __future__ import annotations

from typing import Any

import numpy as np

MASK32 = 0xFFFFFFFF


def _mul32(x: Any, c: int) -> Any:
    """(x · c) mod 2^32 for 0 <= x < 2^32 held in int64: every product stays below 2^49."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & MASK32


def mix32(x: Any) -> Any:
    """lowbias32 on int64 arrays (numpy) or tensors (torch) holding 32-bit values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x21F0AAAD)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x735A2D97)
    return x ^ (x >> 15)


def uniforms(seeds: np.ndarray, positions: int, first: int = 0) -> np.ndarray:
    """u(seed, k) for each seed (rows) and k = first..first+positions-1 (columns):
    float64 in (0, 1], 53 random bits each."""
    seeds = _as_int64(seeds)
    lo, hi = seeds & MASK32, (seeds >> 32) & MASK32  # a 63-bit seed: both halves count
    key = mix32(mix32(lo ^ 0x9E3779B9) ^ hi)[:, None]
    k = np.arange(first, first + positions, dtype=np.int64)[None, :] & MASK32
    a = mix32(key ^ k)  # 32 high bits
    b = mix32(a ^ 0x85EBCA6B) >> 11  # 21 low bits
    return ((a << 21 | b).astype(np.float64) + 0.5) * 2.0**-53


def uniforms_at(seeds: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """u(seeds[i], positions[i]) for each i: the values `uniforms` gives, one per row."""
    seeds = _as_int64(seeds)
    lo, hi = seeds & MASK32, (seeds >> 32) & MASK32
    key = mix32(mix32(lo ^ 0x9E3779B9) ^ hi)
    a = mix32(key ^ (np.asarray(positions, dtype=np.int64) & MASK32))
    b = mix32(a ^ 0x85EBCA6B) >> 11
    return ((a << 21 | b).astype(np.float64) + 0.5) * 2.0**-53


def _as_int64(seeds) -> np.ndarray:
    """Seeds as int64 bit patterns: any integers, taken modulo 2^64."""
    seeds = np.asarray(seeds)
    if seeds.dtype.kind in "iu":
        return seeds.astype(np.uint64).view(np.int64) if seeds.dtype.kind == "u" \
            else seeds.astype(np.int64)
    return np.array([int(s) & (2**64 - 1) for s in seeds.tolist()], dtype=np.uint64).view(np.int64)


def penalise(logits, penalty, seen):
    """The repetition penalty on the tokens `seen` (a boolean mask like logits): a
    positive logit divided by it, a negative one multiplied (Keskar et al. 2019, as
    transformers and vLLM apply it, before the temperature)."""
    import torch

    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def filtered_logprobs(logits, temperature, top_k=0, top_p=1.0, penalty=None, seen=None):
    """log-probabilities of the distribution a token is drawn from, for a batch of
    logits (float): the repetition penalty on the tokens `seen` (see `penalise`), the
    temperature, top-k and top-p. Each setting is a number for the whole batch or a
    column tensor (rows, 1) per row; top_k 0 and top_p 1.0 are off."""
    import torch

    if seen is not None:
        logits = penalise(logits, penalty, seen)
    logits = logits / temperature
    per_row_k = isinstance(top_k, torch.Tensor)
    if per_row_k or top_k:
        if per_row_k:  # each row its own k (0: all of the vocabulary)
            ordered = torch.sort(logits, dim=-1, descending=True).values
            k = torch.where(top_k > 0, top_k, logits.shape[-1]).clamp_max(logits.shape[-1])
            kth = ordered.gather(1, k.long() - 1)
        else:
            kth = torch.topk(logits, min(int(top_k), logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if isinstance(top_p, torch.Tensor) or top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(ordered, dim=-1)
        # drop a token once the tokens before it already hold top_p of the mass
        drop = probs.cumsum(dim=-1) - probs > top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop),
                                    float("-inf"))
    return torch.log_softmax(logits, dim=-1)


def draw(logprobs, u):
    """Row i's token: the inverse of its cumulative distribution at u[i] (float64, on
    the logits' device), and that token's log-probability. One vectorised step for the
    batch; only tokens of positive probability can come out (the first index whose
    cumulative sum reaches u times the total)."""
    import torch

    cdf = logprobs.exp().double().cumsum(dim=-1)
    target = (u * cdf[:, -1]).unsqueeze(1)
    token = torch.searchsorted(cdf, target).squeeze(1).clamp_max(logprobs.shape[-1] - 1)
    return token, logprobs.gather(1, token[:, None])[:, 0]


def greedy(logits):
    """Temperature 0: each row's most likely token; its log-probability is 0 (drawn
    with certainty)."""
    import torch

    token = logits.argmax(dim=-1)
    return token, torch.zeros(token.shape, dtype=logits.dtype, device=logits.device)
