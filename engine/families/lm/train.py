"""What a language model brings to engine.fit: packed token blocks, the loss, the model
factory and how the trained model is saved. The loop itself is engine/fit/loop.py.

Stories are concatenated as [EOT] s1 [EOT] s2 ... and cut into blocks of `context`
tokens; every block is one training row. In this process (`trainer: local`) the blocks
come from the mix in memory (`TableBlocks`); on Ray Train workers each worker streams
its shard of a Ray Dataset of blocks (`ShardBlocks`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa

BLOCK = "input_ids"
TRAIN_CURVE = "train_curve.json"


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


def pack_batch(batch: pa.Table, context: int, eos: int) -> pa.Table:
    """Ray Data batch function: a batch of stories -> a batch of packed blocks."""
    blocks = pack_blocks(batch.column("ids").to_pylist(), context, eos)
    flat = pa.array(blocks.ravel())
    return pa.table({BLOCK: pa.FixedSizeListArray.from_arrays(flat, context)})


def total_steps(tokens: int, stories: int, context: int, batch_size: int, epochs: float,
                workers: int, token_budget: int | None) -> int:
    blocks = (tokens + stories + 1) // context
    budget_blocks = blocks * epochs if token_budget is None else token_budget / context
    return max(1, math.ceil(budget_blocks / (batch_size * workers)))


def lm_loss(engine, x, generator):
    """Next-token cross-entropy of a batch of blocks (the generator is unused: a
    language model's loss draws no noise)."""
    return engine(input_ids=x, labels=x).loss


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


def save_model(module, curve: list[tuple[int, float]], out: Path) -> None:
    """Weights, config and train curve of an HF checkpoint (the family adds the
    tokenizer: a Ray Train worker may run on a node without it)."""
    module.save_pretrained(out, safe_serialization=True)
    (out / TRAIN_CURVE).write_text(json.dumps(curve))


class TableBlocks:
    """In-process batches: shuffled stories, packed, shuffled blocks, repeated per epoch
    until the loop has its steps."""

    def __init__(self, table: pa.Table, context: int, eos: int, batch_size: int, seed: int):
        self.ids = table.column("ids").to_pylist()
        self.context, self.eos, self.batch_size, self.seed = context, eos, batch_size, seed

    def __call__(self, rank: int, world: int) -> Iterator:
        import torch

        rng = np.random.default_rng(self.seed)
        while True:
            order = rng.permutation(len(self.ids))
            blocks = pack_blocks([self.ids[i] for i in order], self.context, self.eos)
            if len(blocks) < self.batch_size:
                raise ValueError(f"the mix packs into {len(blocks)} blocks of {self.context} "
                                 f"tokens, fewer than one batch of {self.batch_size}")
            blocks = blocks[rng.permutation(len(blocks))]
            for start in range(0, len(blocks) - self.batch_size + 1, self.batch_size):
                yield torch.from_numpy(blocks[start:start + self.batch_size])


class ShardBlocks:
    """On a Ray Train worker: its shard of the dataset of blocks ("train"), batch after
    batch, epoch after epoch, with a seeded local shuffle."""

    def __init__(self, batch_size: int, seed: int):
        self.batch_size, self.seed = batch_size, seed

    def __call__(self, rank: int, world: int) -> Iterator:
        import ray.train
        import torch

        shard = ray.train.get_dataset_shard("train")
        epoch = 0
        while True:
            for batch in shard.iter_torch_batches(batch_size=self.batch_size, drop_last=True,
                                                  dtypes=torch.int64,
                                                  local_shuffle_buffer_size=8 * self.batch_size,
                                                  local_shuffle_seed=self.seed + epoch + rank):
                yield batch[BLOCK]
            epoch += 1


def read_curve(directory: Path) -> list[tuple[int, float]]:
    return [tuple(x) for x in json.loads((Path(directory) / TRAIN_CURVE).read_text())]


def fit_settings(p: Any) -> dict[str, Any]:
    """The loop settings a language model's family parameters give (LoopConfig fields
    other than steps and seed)."""
    return {"batch_size": p.batch_size, "lr": p.lr, "warmup": p.warmup, "min_lr_ratio": 0.1,
            "weight_decay": p.weight_decay, "betas": (0.9, 0.95), "grad_clip": 1.0,
            "precision": p.precision, "zero_stage": p.zero_stage, "log_every": p.log_every,
            "threads": p.threads}
