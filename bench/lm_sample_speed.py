"""Sampling throughput: the engine's actor pool against one story at a time.

Side by side in one run, same freshly initialised model (so every story runs to the
length limit and both sides generate the same number of tokens):

  engine  — engine.families.lm.sampling.sample_corpus: Ray Data actor pool of batched
            KV-cache decoders (per-story seeds), actor start-up included
  naive   — for each story: model.generate(do_sample=True) from BOS, one at a time

    python bench/lm_sample_speed.py [--model small] [--stories 1024] [--naive-stories 64]
"""
from __future__ import annotations

import argparse
import tempfile
import time

if __name__ == "__main__":
    import ray
    import torch

    from engine.families.lm import grammar, zoo
    from engine.families.lm.sampling import SampleSettings, sample_corpus
    from engine.families.lm.tokenizer import train_tokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small", choices=list(zoo.ZOO))
    ap.add_argument("--stories", type=int, default=1024)
    ap.add_argument("--naive-stories", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64, help="tokens per story")
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    a = ap.parse_args()

    tok = train_tokenizer([s.text for s in grammar.sample_stories(1000, 0)], 1024)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    model = zoo.build(zoo.ZOO[a.model], len(tok), 256, eos, eos, pad, seed=0).eval()
    never = len(tok) + 1  # an id no model emits: every story runs to the length limit
    with tempfile.TemporaryDirectory() as ckpt:
        model.save_pretrained(ckpt)
        tok.save_pretrained(ckpt)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR")
        s = SampleSettings(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=a.tokens,
                           eos=never, batch_size=a.batch, threads=1)
        start = time.perf_counter()
        table = sample_corpus("hf", ckpt, [[eos]] * a.stories, list(range(a.stories)), s,
                              actors=a.actors, cpus_per_actor=0.5, gpus_per_actor=0)
        engine_s = time.perf_counter() - start
        engine_tokens = int(sum(table.column("n_tokens").to_pylist()))
        ray.shutdown()

    torch.set_num_threads(2)
    start = time.perf_counter()
    naive_tokens = 0
    with torch.inference_mode():
        for i in range(a.naive_stories):
            torch.manual_seed(i)
            out = model.generate(input_ids=torch.tensor([[eos]]), do_sample=True, temperature=1.0,
                                 top_k=0, max_new_tokens=a.tokens, min_new_tokens=a.tokens,
                                 pad_token_id=pad)
            naive_tokens += out.shape[1] - 1
    naive_s = time.perf_counter() - start

    print(f"sampling throughput, model {a.model}, {a.tokens} tokens per story, CPU")
    print(f"  engine actor pool ({a.actors} actors × batch {a.batch}, {a.stories} stories, "
          f"start-up included): {engine_tokens / engine_s:8.0f} tokens/s")
    print(f"  naive generate, one story at a time ({a.naive_stories} stories):"
          f"{' ' * 14}{naive_tokens / naive_s:8.0f} tokens/s")
    print(f"  engine / naive: {(engine_tokens / engine_s) / (naive_tokens / naive_s):.1f}×")
