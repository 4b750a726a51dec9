"""The transformers backend: batched decoding with a KV cache in a Ray Data actor pool,
each actor loading the generation's checkpoint once (onto the GPU Ray gave it, else the
CPU); beam search through transformers' `generate`."""
from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from engine.corpus import ROW
from engine.families.lm.sampling.base import Sampler, SampleSettings, story_rows
from engine.families.lm.sampling.draws import (draw, filtered_logprobs, greedy, penalise,
                                               uniforms)

# On a GPU, how many steps pass between looks at whether every story has ended (each
# look waits for the device); on a CPU the look is free and made every step.
DONE_CHECK_STEPS = 8
# A batch sheds its ended stories once no more than this share of it is still going.
COMPACT = 0.75


def generate(model, prompts: list[list[int]], seeds: list[int], s: SampleSettings) -> list[dict]:
    """Decode a batch of equal-length prompts with a KV cache. Row i's draws come only
    from seeds[i] (engine/families/lm/sampling/draws.py): the whole batch's tokens are
    drawn in one step, and a story is the same whatever batch it is in."""
    import torch

    if len({len(p) for p in prompts}) != 1:
        raise ValueError("generate() takes prompts of one length")
    if s.beams > 1:
        return beam_search(model, prompts, s)
    n, steps = len(prompts), s.max_new_tokens
    device = next(model.parameters()).device
    x = torch.tensor(prompts, dtype=torch.long, device=device)
    u = torch.from_numpy(uniforms(seeds, steps)).to(device)  # (n, steps): every draw
    tokens = torch.full((n, steps), s.eos, dtype=torch.long, device=device)
    logprob = torch.zeros(n, dtype=torch.float64, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    active = torch.arange(n, device=device)  # the batch's rows still decoded
    check = 1 if device.type == "cpu" else DONE_CHECK_STEPS
    past, seen = None, None
    with torch.inference_mode():
        if s.repetition_penalty != 1.0:  # which tokens each story holds, its prompt's included
            seen = torch.zeros(n, model.config.vocab_size, dtype=torch.bool, device=device)
            seen.scatter_(1, x, True)
        for k in range(steps):
            o = model(input_ids=x, past_key_values=past, use_cache=True)
            past = o.past_key_values
            logits = o.logits[:, -1, :].float()
            if s.temperature == 0:
                token, lp = greedy(logits if seen is None else
                                   penalise(logits, s.repetition_penalty, seen))
            else:
                token, lp = draw(filtered_logprobs(logits, s.temperature, s.top_k, s.top_p,
                                                   s.repetition_penalty, seen), u[active, k])
            tokens[active, k] = token
            ended = done[active]
            logprob[active] += torch.where(ended, 0.0, lp.double())  # its EOT counts, not after
            done[active] = ended | (token == s.eos)
            x = token[:, None]
            if seen is not None:
                seen.scatter_(1, x, True)
            if (k + 1) % check:
                continue
            going = ~done[active]
            left = int(going.sum())
            if left == 0:
                break
            if left <= COMPACT * len(active):
                # Stories that ended leave the batch: the rest decode without them
                # (stories end at different lengths; a batch otherwise runs to its longest).
                keep = going.nonzero()[:, 0]
                active, x = active[keep], x[keep]
                past.batch_select_indices(keep)
                if seen is not None:
                    seen = seen[keep]
    # one copy to the host per batch
    rows, finished, logprob = tokens.tolist(), done.tolist(), logprob.tolist()
    return [{"ids": row[:row.index(s.eos)] if end else row, "logprob": float(lp),
             "finished": bool(end)} for row, lp, end in zip(rows, logprob, finished)]


def beam_search(model, prompts: list[list[int]], s: SampleSettings) -> list[dict]:
    """Each prompt's best beam by transformers' beam search (`generate` with num_beams,
    the repetition penalty as its logits processor). Deterministic: seeds play no part.
    A story's `logprob` is its log-probability under the model itself (temperature 1,
    no penalty; its EOT counted when it ended): beam search draws from no distribution,
    and this is what vLLM's beam search scores beams by."""
    import torch

    device = next(model.parameters()).device
    x = torch.tensor(prompts, dtype=torch.long, device=device)
    with torch.inference_mode():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                             num_beams=s.beams, num_return_sequences=1,
                             max_new_tokens=s.max_new_tokens,
                             repetition_penalty=s.repetition_penalty,
                             eos_token_id=s.eos, pad_token_id=s.eos)
    rows = []
    for new in out[:, x.shape[1]:].tolist():
        # a beam that ended is padded with EOT after its own
        finished = s.eos in new
        rows.append({"ids": new[:new.index(s.eos)] if finished else new, "finished": finished})
    logprob = model_logprob(model, prompts, [r["ids"] + ([s.eos] if r["finished"] else [])
                                             for r in rows])
    return [{**r, "logprob": float(lp)} for r, lp in zip(rows, logprob)]


def model_logprob(model, prompts: list[list[int]], continuations: list[list[int]]) -> np.ndarray:
    """The log-probability of each continuation after its prompt under the model at
    temperature 1, in one padded forward pass."""
    import torch

    device = next(model.parameters()).device
    seqs = [p + c for p, c in zip(prompts, continuations)]
    width = max(map(len, seqs))
    x = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    scored = torch.zeros((len(seqs), width - 1), dtype=torch.bool)  # which targets count
    for i, (p, q) in enumerate(zip(prompts, seqs)):
        x[i, :len(q)] = torch.tensor(q)
        mask[i, :len(q)] = 1
        scored[i, len(p) - 1:len(q) - 1] = True
    x, mask, scored = x.to(device), mask.to(device), scored.to(device)
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=x, attention_mask=mask).logits[:, :-1].float(),
                                 dim=-1)
        token_lp = logp.gather(2, x[:, 1:, None])[..., 0] * scored
    return token_lp.sum(dim=1).double().cpu().numpy()


class HFSampler:
    """Ray Data actor: loads the checkpoint once, onto the actor's GPU when it was given
    one (sampler_gpus > 0), else the CPU; decodes batches of requests."""

    def __init__(self, model_dir: str, settings: dict[str, Any], progress: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM

        from engine.families.lm.tokenizer import load_tokenizer
        from engine.files import local_copy
        from engine.fit import current_device, use_threads
        from engine.progress import RowsProgress

        self.progress = RowsProgress(progress)
        model_dir = str(local_copy(model_dir))  # this node's copy if the run is in a bucket
        self.settings = SampleSettings(**settings)
        use_threads(self.settings.threads)
        # fp32 weights whatever the checkpoint holds: a bf16 checkpoint is upcast, so the
        # sampling distribution is the trained model's at full precision on any device.
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32).to(current_device()).eval()
        self.tokenizer = load_tokenizer(model_dir)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        prompts = [list(map(int, p)) for p in batch["prompt_ids"]]
        rows = generate(self.model, prompts, batch["seed"], self.settings)
        self.progress.add(len(rows))
        return story_rows(batch[ROW], prompts, rows, self.tokenizer)


class HFBackend(Sampler):
    """transformers decoding (sampling or beam search) in an actor pool."""

    name = "hf"

    def rows(self, requests):
        import ray.data

        return requests.map_batches(HFSampler, fn_constructor_kwargs={
            "model_dir": self.model_dir, "settings": self.settings.as_dict(),
            "progress": self.progress},
            batch_size=self.settings.batch_size,
            compute=ray.data.ActorPoolStrategy(size=self.actors),
            num_cpus=self.cpus_per_actor, num_gpus=self.gpus_per_actor or None,
            batch_format="numpy")
