"""Training throughput: the engine's fit loop against a bare PyTorch loop.

Side by side in one process, same model, same packed token blocks, same batch size:

  engine  — engine.fit.train with the language model's loss and settings: the DeepSpeed
            engine (AdamW via torch_adam, warmup + cosine schedule, gradient clipping),
            the inner loop every Ray Train worker runs
  bare    — model(x, labels=x).loss.backward(); clip; AdamW.step(); zero_grad()

On a GPU both run in bf16 (DeepSpeed's bf16 mode vs torch.autocast) and the script
also prints model FLOPs utilisation, 6·N·tokens/s over the GPU's bf16 peak.

    python bench/lm_fit_speed.py [--model base] [--steps 30] [--context 256] [--batch 16]
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def blocks(vocab: int, context: int, n: int, seed: int = 0):
    from engine.families.lm import grammar
    from engine.families.lm.tokenizer import train_tokenizer
    from engine.families.lm.train import pack_blocks

    texts = [s.text for s in grammar.sample_stories(4000, seed)]
    tok = train_tokenizer(texts, vocab)
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    packed = pack_blocks(ids, context, tok.eos_token_id)
    reps = int(np.ceil(n / len(packed)))
    return np.concatenate([packed] * reps)[:n], tok


def main() -> None:
    import torch

    from engine.families.lm import zoo
    from engine.families.lm.train import ModelBuilder, lm_loss
    from engine.fit import LoopConfig, train

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="base", choices=list(zoo.ZOO))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup-steps", type=int, default=5)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=2048)
    a = ap.parse_args()

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    total = a.steps + a.warmup_steps
    data, tok = blocks(a.vocab, a.context, total * a.batch)
    batches = [torch.from_numpy(data[i * a.batch:(i + 1) * a.batch]) for i in range(total)]
    eos, pad = tok.eos_token_id, tok.pad_token_id
    size = zoo.ZOO[a.model]
    n_params = zoo.parameter_count(size, len(tok), a.context)
    tokens = a.steps * a.batch * a.context

    # engine: DeepSpeed inner loop; time the steps after the warm-up ones
    cfg = LoopConfig(steps=total, batch_size=a.batch, lr=1e-3, warmup=0.05, weight_decay=0.1,
                     betas=(0.9, 0.95), grad_clip=1.0, precision="bf16" if cuda else "fp32",
                     seed=0, log_every=10**9)
    stamps = []

    def timed():
        for i, b in enumerate(batches):
            if i == a.warmup_steps:
                if cuda:
                    torch.cuda.synchronize()
                stamps.append(time.perf_counter())
            yield b  # the loop moves each batch to its device itself
    train(ModelBuilder(a.model, len(tok), a.context, eos, eos, pad), timed(), lm_loss, cfg)
    if cuda:
        torch.cuda.synchronize()
    engine_s = time.perf_counter() - stamps[0]

    # bare PyTorch
    model = zoo.build(size, len(tok), a.context, eos, eos, pad, seed=0).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    for i, b in enumerate(batches):
        if i == a.warmup_steps:
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
        x = b.to(device)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    bare_s = time.perf_counter() - start

    where = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"fit throughput, model {a.model} ({n_params / 1e6:.2f}M parameters), context "
          f"{a.context}, batch {a.batch}, {a.steps} timed steps, {where}")
    print(f"  engine (DeepSpeed inner loop): {tokens / engine_s:10.0f} tokens/s")
    print(f"  bare PyTorch loop:             {tokens / bare_s:10.0f} tokens/s")
    print(f"  engine / bare:                 {bare_s / engine_s:10.2f}")
    if cuda:
        peak = 989e12 if "H100" in where or "H200" in where else 312e12
        print(f"  MFU engine {6 * n_params * tokens / engine_s / peak:.1%}, bare "
              f"{6 * n_params * tokens / bare_s / peak:.1%} (6·N·tokens/s over {peak / 1e12:.0f} TFLOP/s)")


if __name__ == "__main__":
    main()
