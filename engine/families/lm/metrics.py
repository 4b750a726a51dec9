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
              batch_tokens: int = 8192) -> np.ndarray:
    """Total negative log-likelihood (nats) of each story, scored as [EOT] s [EOT], on
    the model's device. Stories are batched by length (about `batch_tokens` tokens a
    batch) so little compute goes to padding; on a GPU the forward pass runs under bf16
    autocast where the GPU has it, and the log-softmax in fp32."""
    import torch

    device = next(model.parameters()).device
    autocast = device.type == "cuda" and torch.cuda.is_bf16_supported()
    nll = np.zeros(len(ids))
    order = np.argsort([len(s) for s in ids], kind="stable")
    start = 0
    with torch.inference_mode():
        while start < len(order):
            width = min(len(ids[order[start]]), context - 2) + 2
            rows = max(1, batch_tokens // width)
            chunk_idx = order[start:start + rows]
            chunk = [[eos] + list(ids[i])[: context - 2] + [eos] for i in chunk_idx]
            width = max(map(len, chunk))
            x = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, s in enumerate(chunk):
                x[i, : len(s)] = torch.tensor(s)
                mask[i, : len(s)] = 1
            x, mask = x.to(device), mask.to(device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                logits = model(input_ids=x, attention_mask=mask).logits
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            target = x[:, 1:]
            token_lp = logp.gather(2, target[..., None])[..., 0] * mask[:, 1:]
            nll[chunk_idx] = -token_lp.sum(dim=1).double().cpu().numpy()
            start += len(chunk_idx)
    return nll


def predicted_tokens(ids: list[list[int]], context: int) -> np.ndarray:
    return np.asarray([min(len(s), context - 2) + 1 for s in ids])


def test_metrics(model, test: pa.Table, eos: int, pad: int, context: int,
                 batch_tokens: int = 8192) -> dict[str, float]:
    ids = test.column("ids").to_pylist()
    nll = story_nll(model, ids, eos, pad, context, batch_tokens)
    tokens = predicted_tokens(ids, context).sum()
    metrics = {"test_loss": float(nll.sum() / tokens)}
    if "true_logprob" in test.column_names:
        truth = -float(np.sum(test.column("true_logprob").to_numpy()))
        metrics["truth_loss"] = truth / tokens
        metrics["kl_to_truth"] = metrics["test_loss"] - metrics["truth_loss"]
    return metrics


def evaluate_checkpoint(model_source: str, test: pa.Table, eos: int, pad: int, context: int,
                        threads: int) -> dict[str, float]:
    """Load a saved model where this process runs (a GPU if it has one) and score the
    real test stories. The weights are loaded in fp32: a bf16 checkpoint is upcast, so a
    CPU computes in full precision and a GPU autocasts (see story_nll)."""
    import torch
    from transformers import AutoModelForCausalLM

    from engine.files import local_copy
    from engine.fit import current_device, use_threads

    use_threads(threads)
    device = current_device()
    model = AutoModelForCausalLM.from_pretrained(str(local_copy(model_source)),
                                                 dtype=torch.float32).to(device).eval()
    # A GPU takes far bigger batches than a CPU's caches like.
    return test_metrics(model, test, eos, pad, context,
                        batch_tokens=65536 if device.type == "cuda" else 8192)


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
