"""What collapse takes first, measured on a sampled corpus (issue 14.5): the tails of the
token distribution and the variety between and within stories.

- `zipf_slope`: the slope of log frequency against log rank of the corpus's tokens
  (those seen at least ZIPF_MIN_COUNT times); natural text sits near -1, a distribution
  losing its tail falls off faster.
- `rare_token_mass`: the share of the corpus's tokens that are rare in the real data,
  rare meaning the real training data's least frequent tokens that together make up
  RARE_SHARE (10%) of its tokens; real data scores ~0.10 by construction, a corpus whose
  tails have collapsed less (Dohmatob et al. 2024).
- `rep_4`: the share of each story's 4-grams that repeat an earlier 4-gram of the same
  story, averaged over stories (Welleck et al. 2019's seq-rep-4); loops score high.
- `self_bleu`: BLEU-4 of each of the first SELF_BLEU_STORIES stories (request order)
  against the others as references, averaged (Zhu et al. 2018): 1 when the stories are
  copies of one another, low when they vary.

Each is computed from per-batch partials merged in the corpus statistics' one pass
(engine/families/lm/metrics.py): token counts as (id, count) pairs, sums, and the few
stories self-BLEU reads.
"""
from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pyarrow as pa

ZIPF_MIN_COUNT = 5
RARE_SHARE = 0.10
REP_N = 4
SELF_BLEU_STORIES = 100
BLEU_N = 4


def token_partial(batch: pa.Table) -> dict:
    """One batch's token counts, as (id, count) lists."""
    flat = batch.column("ids").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    tokens, counts = np.unique(flat.astype(np.int64), return_counts=True)
    return {"tail_tokens": tokens.tolist(), "tail_counts": counts.tolist()}


def token_partial_row(batch: pa.Table) -> dict:
    """Ray Data batch function: token_partial as one row (a JSON string: its lists'
    lengths vary by batch)."""
    import json

    return {"tail": [json.dumps(token_partial(batch))]}


def partial(batch: pa.Table) -> dict:
    """One batch (columns _row, ids): token counts, rep-n sums, and the stories
    among the first SELF_BLEU_STORIES requests."""
    rep, stories = 0.0, 0
    ids = batch.column("ids").to_pylist()
    for story in ids:
        if len(story) >= REP_N:
            grams = [tuple(story[i:i + REP_N]) for i in range(len(story) - REP_N + 1)]
            rep += 1.0 - len(set(grams)) / len(grams)
            stories += 1
    rows = batch.column("_row").to_numpy()
    early = [(int(r), s) for r, s in zip(rows, ids) if r < SELF_BLEU_STORIES]
    return {**token_partial(batch), "rep_sum": rep, "rep_stories": stories,
            "bleu_rows": [r for r, _ in early], "bleu_ids": [s for _, s in early]}


def token_counts(parts) -> dict[int, int]:
    total: Counter = Counter()
    for p in parts:
        total.update(dict(zip(p["tail_tokens"], p["tail_counts"])))
    return dict(total)


def rare_tokens(counts: dict[int, int], share: float = RARE_SHARE) -> np.ndarray:
    """The least frequent tokens that together make up `share` of the tokens."""
    if not counts:
        return np.zeros(0, dtype=np.int64)
    ids = np.array(list(counts), dtype=np.int64)
    c = np.array([counts[i] for i in ids], dtype=np.float64)
    order = np.argsort(c, kind="stable")
    covered = np.cumsum(c[order]) / c.sum()
    return np.sort(ids[order[: int(np.searchsorted(covered, share, side="right"))]])


def zipf_slope(counts: dict[int, int]) -> float:
    c = np.sort(np.array([v for v in counts.values() if v >= ZIPF_MIN_COUNT], dtype=float))[::-1]
    if len(c) < 3:
        return float("nan")
    rank = np.arange(1, len(c) + 1, dtype=float)
    return float(np.polyfit(np.log(rank), np.log(c), 1)[0])


def self_bleu(stories: list[list[int]], n: int = BLEU_N) -> float:
    """Mean BLEU-n of each story against all the others (uniform n-gram weights, clipped
    counts, brevity penalty to the closest reference length, +1 smoothing of the higher
    orders so a short story does not score 0).

    The engine's own, not sacrebleu's: BLEU here is over the model's own token ids, the
    units it was trained and sampled in, exactly; sacrebleu scores detokenized text
    through its own word tokenizer, which would measure the tokenizer's round trip as
    much as the stories."""
    stories = [list(s) for s in stories if len(s) >= 1]
    if len(stories) < 2:
        return float("nan")
    grams = [[Counter(tuple(s[i:i + k]) for i in range(len(s) - k + 1))
              for k in range(1, n + 1)] for s in stories]
    scores = []
    for h, story in enumerate(stories):
        log_precision = 0.0
        for k in range(n):
            ceiling: Counter = Counter()
            for r in range(len(stories)):
                if r != h:
                    ceiling |= grams[r][k]  # the most times any reference has each n-gram
            hyp = grams[h][k]
            matched = sum(min(c, ceiling[g]) for g, c in hyp.items())
            total = sum(hyp.values())
            smooth = 0 if k == 0 else 1
            if matched + smooth == 0 or total + smooth == 0:
                log_precision = -math.inf
                break
            log_precision += math.log((matched + smooth) / (total + smooth)) / n
        lengths = [len(s) for r, s in enumerate(stories) if r != h]
        closest = min(lengths, key=lambda x: (abs(x - len(story)), x))
        brevity = 0.0 if len(story) >= closest else 1 - closest / len(story)
        scores.append(math.exp(log_precision + brevity) if log_precision > -math.inf else 0.0)
    return float(np.mean(scores))


def merge(parts, real_rare: np.ndarray | None) -> dict[str, float]:
    counts = token_counts(parts)
    total = sum(counts.values())
    stats = {"zipf_slope": zipf_slope(counts),
             "rep_4": (sum(p["rep_sum"] for p in parts)
                       / max(1, sum(p["rep_stories"] for p in parts)))}
    if real_rare is not None:
        rare = sum(counts.get(int(t), 0) for t in real_rare)
        stats["rare_token_mass"] = rare / total if total else float("nan")
    early = sorted((r, s) for p in parts for r, s in zip(p["bleu_rows"], p["bleu_ids"]))
    stats["self_bleu"] = self_bleu([s for _, s in early])
    return stats
