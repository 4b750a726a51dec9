"""Each generation's samples scored under generation 1's model (Shumailov et al., Nature
2024, Fig. 1b: histograms of the perplexity of every generated sequence as the first
model, trained on real data, sees it). Collapse shows as the histogram drifting to
low perplexity (the first model's most probable stories, over-produced) while a tail of
stories it finds improbable grows (errors the later models made up).

first_model_loss       nats per token of the generation's samples under generation 1's
                       model (scored as test_loss scores real stories)
first_model_tail_mass  the fraction of the samples whose perplexity under generation
                       1's model lies beyond the real test stories' 99th percentile
                       (real data: about 1%)
Histograms (`collapse plot` draws them per generation): `first_model_perplexity`, the
samples', and `first_model_perplexity_real`, the real test stories', counts over fixed
log-spaced perplexity bins, so that generations and chains compare bin by bin.

The corpus streams through one process batch by batch (where the study's GPU is, as
evaluation): histogram counts and sums are all it keeps.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from engine.families.lm.metrics import predicted_tokens, story_nll

# Perplexity 1 to 10^4, 15 bins a decade; a story beyond falls in an end bin.
EDGES = np.logspace(0, 4, 61)
TAIL_QUANTILE = 0.99
BATCH_ROWS = 4096


def histogram(perplexity: np.ndarray) -> np.ndarray:
    return np.histogram(np.clip(perplexity, EDGES[0], EDGES[-1]), bins=EDGES)[0]


def story_perplexity(model, ids: list[list[int]], eos: int, pad: int, context: int,
                     batch_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(each story's perplexity, each story's predicted tokens) under `model`."""
    nll = story_nll(model, ids, eos, pad, context, batch_tokens)
    tokens = predicted_tokens(ids, context)
    return np.exp(nll / tokens), nll


def against_first(first_source: str, test: pa.Table, corpus, eos: int,
                  pad: int, context: int, threads: int) -> tuple[dict[str, float], dict]:
    """(metrics, histograms) of `corpus` (an engine.corpus.CorpusView, or None) under
    the model at `first_source`, against the real `test` stories."""
    import torch
    from transformers import AutoModelForCausalLM

    from engine.files import local_copy
    from engine.fit import current_device, use_threads

    use_threads(threads)
    device = current_device()
    model = AutoModelForCausalLM.from_pretrained(str(local_copy(first_source)),
                                                 dtype=torch.float32).to(device).eval()
    batch_tokens = 65536 if device.type == "cuda" else 8192
    real, _ = story_perplexity(model, test.column("ids").to_pylist(), eos, pad, context,
                               batch_tokens)
    threshold = float(np.quantile(real, TAIL_QUANTILE))
    histograms = {"first_model_perplexity_real": _recorded(histogram(real), threshold)}
    if corpus is None:
        return {}, histograms
    counts = np.zeros(len(EDGES) - 1, dtype=np.int64)
    rows = tail = tokens = 0
    nll_sum = 0.0
    for batch in corpus.dataset(["ids"]).iter_batches(batch_size=BATCH_ROWS, batch_format="pyarrow"):
        ids = batch.column("ids").to_pylist()
        perplexity, nll = story_perplexity(model, ids, eos, pad, context, batch_tokens)
        counts += histogram(perplexity)
        rows += len(ids)
        tail += int((perplexity > threshold).sum())
        nll_sum += float(nll.sum())
        tokens += int(predicted_tokens(ids, context).sum())
    histograms["first_model_perplexity"] = _recorded(counts, threshold)
    return {"first_model_loss": nll_sum / max(1, tokens),
            "first_model_tail_mass": tail / max(1, rows)}, histograms


def _recorded(counts: np.ndarray, threshold: float) -> dict:
    return {"edges": [float(e) for e in EDGES], "counts": [int(c) for c in counts],
            "real_p99": threshold}
