"""Sampling in the calling process (a study's `sampler_actors: 0`): the hf backend's
decoding loop and draws, without an actor to start each generation. For minutes-long
CPU studies (the quickstart), where a sampler process's start-up (importing torch and
transformers, loading the checkpoint, Ray Data's request and writer stages: ~15-20 s on
two cores) costs more than decoding its stories; the stories are the ones an actor pool
would make from the same seeds."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow as pa

from engine.corpus import ROW
from engine.families.lm.sampling.base import (REQUESTS_PER_SPAN, Requests, SampleSettings,
                                              _MakeRequests, story_rows)


def sampled_here(model_dir: str, requests: Requests, s: SampleSettings, rows_per_table: int,
                 progress: str | None = None) -> Iterator[pa.Table]:
    """The requested stories, decoded here batch by batch and handed on in tables of at
    most `rows_per_table` rows, in request order: at most one table is held."""
    import torch
    from transformers import AutoModelForCausalLM

    from engine.families.lm.sampling.hf import generate
    from engine.families.lm.tokenizer import load_tokenizer
    from engine.files import local_copy
    from engine.fit import current_device, use_threads
    from engine.progress import RowsProgress

    model_dir = str(local_copy(model_dir))
    use_threads(s.threads)
    # fp32 weights whatever the checkpoint holds, as the actors load it
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(
        current_device()).eval()
    tokenizer = load_tokenizer(model_dir)
    made = RowsProgress(progress)
    expand = _MakeRequests(requests)
    pending: list[pa.Table] = []
    held = 0
    end = requests.start + requests.n
    for first in range(requests.start, end, REQUESTS_PER_SPAN):
        span = expand({"start": np.array([first]),
                       "end": np.array([min(end, first + REQUESTS_PER_SPAN)])})
        for k in range(0, len(span[ROW]), s.batch_size):
            rows = span[ROW][k:k + s.batch_size]
            prompts = [list(map(int, p)) for p in span["prompt_ids"][k:k + s.batch_size]]
            decoded = generate(model, prompts, span["seed"][k:k + s.batch_size], s)
            pending.append(story_rows(rows, prompts, decoded, tokenizer))
            made.add(len(rows))
            held += len(rows)
            if held >= rows_per_table:
                table = pa.concat_tables(pending)
                yield table.slice(0, rows_per_table)
                pending, held = [table.slice(rows_per_table)], table.num_rows - rows_per_table
    if held:
        yield pa.concat_tables(pending)
