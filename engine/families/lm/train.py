"""What a language model brings to engine.fit: packed token blocks, the loss, the model
factory and how the trained model is saved. The loop itself is engine/fit/loop.py.

Stories are concatenated as [EOT] s1 [EOT] s2 ... and cut into blocks of `context`
tokens; every block is one training row. In this process (`trainer: local`) the blocks
come from the mix's files read one at a time (`StreamBlocks`); on Ray Train workers
each worker streams its shard of the mix's stories and packs them itself
(`ShardBlocks`). Either way no process holds the mix.

The mix is never shuffled globally (an all-to-all pass over the whole corpus, every
generation): its files are read in a seeded order and the stories shuffled in a window
of SHUFFLE_STORIES (seeded, a new order every epoch). Stories within a stored corpus are already in random order (i.i.d.
samples; the real split's stories in source order), so the window mixes corpora and
neighbours; what it cannot do is put the corpus's first and last stories in one batch.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa

TRAIN_CURVE = "train_curve.json"
SHUFFLE_STORIES = 10_000  # each worker's shuffle window, in stories


def pack_blocks(ids: Iterable[Iterable[int]], context: int, eos: int) -> np.ndarray:
    """Concatenate stories as [EOT] s1 [EOT] s2 ... and cut the stream into blocks of
    `context` tokens (the last partial block is dropped). (blocks, context) int64."""
    pieces = []
    for story in ids:
        pieces.append(np.asarray([eos], dtype=np.int64))
        pieces.append(np.asarray(story, dtype=np.int64))
    if not pieces:
        return np.zeros((0, context), dtype=np.int64)
    stream = np.concatenate(pieces + [np.asarray([eos], dtype=np.int64)])
    n = len(stream) // context
    return stream[: n * context].reshape(n, context)


def total_steps(tokens: int, stories: int, context: int, batch_size: int, epochs: float,
                workers: int, token_budget: int | None) -> int:
    """Steps that take `epochs` passes over the mix (or `token_budget` tokens): whole
    batches of whole blocks only, so one epoch never spills into a second."""
    blocks = (tokens + stories + 1) // context
    budget_blocks = blocks * epochs if token_budget is None else token_budget / context
    return max(1, math.floor(budget_blocks / (batch_size * workers)))


def token_losses(engine, x):
    """Each token's next-token cross-entropy in a batch of blocks, (batch, context − 1),
    in fp32."""
    import torch

    logits = engine(input_ids=x).logits[:, :-1]
    ce = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), x[:, 1:].reshape(-1), reduction="none")
    return ce.view(x.size(0), -1)


def lm_loss(engine, batch, generator):
    """Next-token cross-entropy of a batch of blocks (the generator is unused: a
    language model's loss draws no noise). A weighted mix's batch is (blocks, each
    token's weight): the weight of the token predicted counts."""
    from engine.fit import split_weights, weighted_mean

    x, weights = split_weights(batch)
    if weights is None:
        return engine(input_ids=x, labels=x).loss
    return weighted_mean(token_losses(engine, x), weights[:, 1:])


class TruncatedCE:
    """Truncated cross-entropy (Shabgahi et al. 2025, "ForTIFAI", arXiv 2509.08972):
    TCE = 1[p_t <= γ] · CE per token, p_t the probability the model gives the next
    token. Tokens it already predicts with confidence above γ add no loss (nor
    gradient): what a model finds likely in its own samples is what it has learned,
    and the rarer tokens are left to be fit. Averaged over every token of the batch
    (the dropped ones count as 0), so the loss keeps its scale per step; γ = 1 is plain
    cross-entropy. A class, not a closure: Ray Train pickles it to its workers."""

    def __init__(self, threshold: float):
        self.threshold = threshold

    def __call__(self, engine, batch, generator):
        from engine.fit import split_weights, truncated, weighted_mean

        x, weights = split_weights(batch)
        return weighted_mean(truncated(token_losses(engine, x), self.threshold),
                             None if weights is None else weights[:, 1:])


def loss_for(definition: dict | None):
    """The fit's loss for a study's `loss` (None: next-token cross-entropy); a
    ParamError naming `loss` for one the engine does not know."""
    from engine.families.base import truncation_threshold

    threshold = truncation_threshold(definition)
    return lm_loss if threshold is None else TruncatedCE(threshold)


class ModelBuilder:
    """A fresh causal LM of a zoo size (picklable: Ray Train ships it to its workers)."""

    def __init__(self, size: str, vocab_size: int, context: int, bos: int, eos: int, pad: int):
        self.args = (size, vocab_size, context, bos, eos, pad)

    def __call__(self):
        from transformers import AutoModelForCausalLM

        from engine.families.lm import zoo

        size, vocab_size, context, bos, eos, pad = self.args
        return AutoModelForCausalLM.from_config(zoo.config(zoo.ZOO[size], vocab_size, context,
                                                           bos, eos, pad))


class CheckpointBuilder:
    """A causal LM loaded from a checkpoint (a path or URI: each Ray Train worker reads
    its node's copy; or a Hugging Face id), in fp32 whatever it was saved in: a warm
    start, or a pretrained model's weights."""

    def __init__(self, checkpoint: str):
        self.checkpoint = checkpoint

    def __call__(self):
        import torch
        from transformers import AutoModelForCausalLM

        from engine.families.lm.pretrained import loadable

        return AutoModelForCausalLM.from_pretrained(loadable(self.checkpoint),
                                                    dtype=torch.float32)


def save_model(module, curve: list[tuple[int, float]], out: Path) -> None:
    """Weights, config and train curve of an HF checkpoint (the family adds the
    tokenizer: a Ray Train worker may run on a node without it)."""
    module.save_pretrained(out, safe_serialization=True)
    (out / TRAIN_CURVE).write_text(json.dumps(curve))


def packed_batches(stories_of_epoch, context: int, eos: int, batch_size: int) -> Iterator:
    """Batches of `batch_size` blocks of `context` tokens from one continuous stream
    [EOT] s1 [EOT] s2 ... (no tokens dropped between batches), epoch after epoch:
    `stories_of_epoch(epoch)` yields the epoch's stories as tables with an `ids` column.
    Stories of a weighted mix (a workflow's `weights`) carry their loss weight
    (corpus.WEIGHT); every token of a story, and the [EOT] before it, then carries it
    too, and a batch is (blocks, token weights)."""
    import torch

    from engine.corpus import WEIGHT

    per_batch = batch_size * context
    epoch = 0
    while True:
        pending = np.zeros(0, dtype=np.int64)
        pending_weights = None
        for stories in stories_of_epoch(epoch):
            ids = stories.column("ids").combine_chunks()
            if len(ids) == 0:
                continue
            lengths = ids.value_lengths().to_numpy(zero_copy_only=False)
            tokens = ids.flatten().to_numpy(zero_copy_only=False)
            # [EOT] before every story: a stream [EOT] s1 [EOT] s2 ...
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            stream = np.insert(tokens.astype(np.int64), starts, eos)
            pending = np.concatenate([pending, stream])
            if WEIGHT in stories.column_names:
                weights = np.repeat(stories.column(WEIGHT).to_numpy().astype(np.float32),
                                    lengths + 1)
                pending_weights = weights if pending_weights is None else \
                    np.concatenate([pending_weights, weights])
            while len(pending) >= per_batch:
                blocks = torch.from_numpy(pending[:per_batch].reshape(batch_size, context).copy())
                pending = pending[per_batch:]
                if pending_weights is None:
                    yield blocks
                    continue
                yield blocks, torch.from_numpy(
                    pending_weights[:per_batch].reshape(batch_size, context).copy())
                pending_weights = pending_weights[per_batch:]
        epoch += 1


def window_shuffled(tables, window: int, rng: np.random.Generator, size: int = 1024):
    """Tables of stories in a seeded shuffle within a window of `window` stories (as
    Ray Data's local shuffle buffer does for Ray Train workers): at most the window and
    one incoming table are held."""
    buffer = None
    for table in tables:
        buffer = table if buffer is None else pa.concat_tables([buffer, table])
        while buffer.num_rows >= window + size:
            picked = np.zeros(buffer.num_rows, dtype=bool)
            picked[rng.choice(buffer.num_rows, size, replace=False)] = True
            yield buffer.filter(pa.array(picked))
            buffer = buffer.filter(pa.array(~picked)).combine_chunks()
    if buffer is not None and buffer.num_rows:
        yield buffer.take(pa.array(rng.permutation(buffer.num_rows)))


class StreamBlocks:
    """In this process (trainer: local): the mix's files streamed in a seeded order
    each epoch (engine.corpus.MixStream), its stories shuffled in a window of
    SHUFFLE_STORIES, packed: the chain's process never holds the mix."""

    def __init__(self, mix, context: int, eos: int, batch_size: int, seed: int):
        self.mix, self.context, self.eos, self.batch_size, self.seed = \
            mix, context, eos, batch_size, seed

    def __call__(self, rank: int, world: int) -> Iterator:
        def stories(epoch: int):
            order_seed = self.seed + 7919 * epoch
            return window_shuffled(self.mix.tables(["ids"], order_seed), SHUFFLE_STORIES,
                                   np.random.default_rng(order_seed))

        return packed_batches(stories, self.context, self.eos, self.batch_size)


class ShardBlocks:
    """On a Ray Train worker: its shard of the mix's stories ("train"), shuffled in a
    seeded window, packed into one continuous stream of blocks, batch after batch,
    epoch after epoch."""

    def __init__(self, context: int, eos: int, batch_size: int, seed: int):
        self.context, self.eos, self.batch_size, self.seed = context, eos, batch_size, seed

    def __call__(self, rank: int, world: int) -> Iterator:
        import ray.train

        shard = ray.train.get_dataset_shard("train")

        def stories(epoch: int):
            return shard.iter_batches(batch_size=1024, batch_format="pyarrow",
                                      local_shuffle_buffer_size=SHUFFLE_STORIES,
                                      local_shuffle_seed=self.seed + 7919 * epoch + rank)

        return packed_batches(stories, self.context, self.eos, self.batch_size)


def read_curve(directory: Path) -> list[tuple[int, float]]:
    return [tuple(x) for x in json.loads((Path(directory) / TRAIN_CURVE).read_text())]


def fit_settings(p: Any) -> dict[str, Any]:
    """The loop settings a language model's family parameters give (LoopConfig fields
    other than steps and seed)."""
    return {"batch_size": p.batch_size, "lr": p.lr, "warmup": p.warmup, "min_lr_ratio": 0.1,
            "weight_decay": p.weight_decay, "betas": (0.9, 0.95), "grad_clip": 1.0,
            "precision": p.precision, "zero_stage": p.zero_stage, "log_every": p.log_every,
            "threads": p.threads}
