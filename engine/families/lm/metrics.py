"""Language-model metrics: cross-entropy on real held-out stories, sample diversity.

test_loss    nats per token on the REAL test split: each story scored as [EOT] s [EOT],
             every story token and the closing EOT predicted
truth_loss   the same stories under the true distribution (grammar corpus only)
kl_to_truth  test_loss − truth_loss: the model's excess cross-entropy over the truth
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa


def story_nll(model, ids: list[list[int]], eos: int, pad: int, context: int,
              batch_size: int = 32) -> np.ndarray:
    """Total negative log-likelihood (nats) of each story, and its predicted tokens."""
    import torch

    nll = np.zeros(len(ids))
    with torch.inference_mode():
        for start in range(0, len(ids), batch_size):
            chunk = [[eos] + list(s)[: context - 2] + [eos] for s in ids[start:start + batch_size]]
            width = max(map(len, chunk))
            x = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, s in enumerate(chunk):
                x[i, : len(s)] = torch.tensor(s)
                mask[i, : len(s)] = 1
            logits = model(input_ids=x, attention_mask=mask).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            target = x[:, 1:]
            token_lp = logp.gather(2, target[..., None])[..., 0] * mask[:, 1:]
            nll[start:start + len(chunk)] = -token_lp.sum(dim=1).numpy()
    return nll


def predicted_tokens(ids: list[list[int]], context: int) -> np.ndarray:
    return np.asarray([min(len(s), context - 2) + 1 for s in ids])


def test_metrics(model, test: pa.Table, eos: int, pad: int, context: int) -> dict[str, float]:
    ids = test.column("ids").to_pylist()
    nll = story_nll(model, ids, eos, pad, context)
    tokens = predicted_tokens(ids, context).sum()
    metrics = {"test_loss": float(nll.sum() / tokens)}
    if "true_logprob" in test.column_names:
        truth = -float(np.sum(test.column("true_logprob").to_numpy()))
        metrics["truth_loss"] = truth / tokens
        metrics["kl_to_truth"] = metrics["test_loss"] - metrics["truth_loss"]
    return metrics


def distinct_ngrams(ids: list[list[int]], n: int) -> float:
    """Distinct n-grams over all n-grams of the corpus (Li et al.'s distinct-n)."""
    grams = [tuple(s[i:i + n]) for s in ids for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def sample_stats(table: pa.Table) -> dict[str, float]:
    ids = table.column("ids").to_pylist()
    lengths = table.column("n_tokens").to_numpy()
    stats = {f"distinct_{n}": distinct_ngrams(ids, n) for n in (1, 2, 3)}
    stats["unique_stories"] = len({tuple(s) for s in ids}) / max(1, len(ids))
    stats["mean_length"] = float(lengths.mean())
    # The sampling distribution's entropy rate, estimated by the samples' own
    # log-probabilities (0 for greedy decoding).
    stats["sample_entropy"] = float(-table.column("logprob").to_numpy().sum()
                                    / max(1, (lengths + table.column("finished").to_numpy()).sum()))
    return stats
