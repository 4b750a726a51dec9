"""One chain of generations — the engine's loop — and its resume.

    for g = 1..G:
        mix    = strategy.mix(g, T)                      which corpora, how many rows
        model  = family.fit(mix)                         (checkpointed)
        scores = family.evaluate(model, real)            on real data, always
        synth  = family.sample(model, n, seed)           (stored before it counts)
        store.write(g, synth)
        more   = family.compare(model 1, model, synth)    against generation 1, real data
        metrics/gen-g.json                               marks generation g done

Each step's output is on disk before the next step starts, and every random draw comes
from derive_seed(study seed, grid point, generation, purpose), so a chain killed at any
moment and run again continues where it stopped and ends with the same numbers.

Seeds leave out the strategy on purpose: every strategy of a grid point sees the same
real data and the same random draws (common random numbers), so differences between
strategies in the table are the strategies' doing, not the noise's.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from engine import strategies
from engine.corpus import CorpusStore, CorpusView, StoredRows, rows_written
from engine.families import family_for
from engine.files import (Location, copy_directory, directory_complete, made_once,
                          node_cache, write_atomic, write_directory, write_json)
from engine.fit import FitContext
from engine.layout import ChainLayout, RunLayout
from engine.progress import fit_steps, rows_sampled, watching
from engine.seeds import derive_seed
from engine.spec import Trial

log = logging.getLogger("engine.chain")
# How a chain's random draws are derived (recorded in trial.json): 2 = from the study
# seed and the parameters stated away from their defaults. A chain recorded otherwise is
# not resumed (its later generations would draw other numbers).
SEED_SCHEME = 2

Reporter = Callable[[int, dict[str, float]], None]


class ChainError(RuntimeError):
    """A chain stopped, said in one line: the chain, the generation, the step, the cause
    and where its log is. `retry`: whether running the chain again may help (a lost node
    or worker) or not (bad data, a corrupt corpus, a wrong parameter: the user acts first)."""

    def __init__(self, message: str, retry: bool = False):
        super().__init__(message, retry)
        self.message, self.retry = message, retry

    def __str__(self) -> str:
        return self.message


def _user_error(e: BaseException) -> bool:
    """Errors that the same run would hit again: data, files, parameters."""
    from engine.corpus import CorpusError

    return isinstance(e, (ValueError, FileNotFoundError, CorpusError, ChainError))


def one_line(e: BaseException) -> str:
    """An exception as one line: the original error inside Ray's wrappers, its message's
    first line, its type where the message alone would not say what went wrong."""
    while getattr(e, "cause", None) is not None and e.cause is not e:  # RayTaskError
        e = e.cause
    text = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    if isinstance(e, ChainError) or (_user_error(e) and text):
        return text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


@dataclass
class _Step:
    """Where a chain is, for the line that says where it stopped."""

    generation: int = 0
    phase: str = "preparing real data"

    def __str__(self) -> str:
        return f"generation {self.generation}, {self.phase}" if self.generation else self.phase


def real_seed(trial: Trial) -> int:
    """The seed of a chain's real data: the study seed and the family alone, so every
    cell of the grid splits (and tokenizes) the same data."""
    return derive_seed(trial.seed, trial.family, "real")


def chain_layout(out: Location | Path | str, trial: Trial) -> ChainLayout:
    return RunLayout.of(out).chain(trial.trial_id)


def recorded_trial_mismatch(out: Location | Path | str, trial: Trial) -> str | None:
    """If `out` already holds this chain with other parameters, say how they differ.
    Read-only, so a bad study can be refused before anything is written."""
    path = chain_layout(out, trial).trial_file
    if not path.exists():
        return None
    recorded = json.loads(path.read_text())
    if recorded.get("seed_scheme") != SEED_SCHEME:
        return ("made by an earlier engine, which derived the chain's random draws from "
                "every parameter (defaults included); its generations cannot be continued "
                "with the same draws")
    mine = trial.to_dict()
    diffs = [f"{k}: {recorded.get(k)!r} on disk, {mine[k]!r} now"
             for k in ("family", "strategy", "seed", "workflow") if recorded.get(k) != mine[k]]
    for k in sorted(set(recorded.get("params", {})) | set(mine["params"])):
        a, b = recorded.get("params", {}).get(k), mine["params"].get(k)
        if a != b:
            diffs.append(f"family.{k}: {a!r} on disk, {b!r} now")
    return "; ".join(diffs) or None


def completed_generations(out: Location | Path | str, trial: Trial) -> int:
    paths = chain_layout(out, trial)
    g = 0
    while paths.metrics(g + 1).exists():
        g += 1
    return g


def run_chain(trial: Trial, generations: int, out: Location | Path | str,
              report: Reporter | None = None, fit_callbacks: tuple = ()) -> None:
    """Run (or resume) one chain up to `generations`. What the engine logs meanwhile is
    appended to the chain's own chain.log (its driver may run on any node of a cluster,
    where nobody reads the worker's stderr). `fit_callbacks` go to the RunConfig of every
    Ray Train fit the chain starts (its Tune trial's TuneReportCallback)."""
    paths = chain_layout(out, trial)
    paths.root.mkdir()
    step = _Step()
    with _chain_log(paths.log_file) as publish:
        try:
            _run_chain(trial, generations, Location.of(out), report, publish,
                       tuple(fit_callbacks), step)
        except Exception as e:
            log.exception("%s: chain failed at %s", trial.trial_id, step)
            if isinstance(e, ChainError):
                raise
            raise ChainError(f"chain {trial.trial_id} stopped at {step}: {one_line(e)} "
                             f"(details: {paths.log_file})", retry=not _user_error(e)) from e


@contextmanager
def _chain_log(where: Location) -> Iterator[Callable[[], None]]:
    """Append the engine's log to `where` while the chain runs. Yields `publish`, which
    the chain calls after each generation: an object store cannot append, so there the
    log is kept in a node-local file and uploaded whole at each call and at the end."""
    if where.is_local:
        local = where.local_path
    else:
        local = node_cache() / "logs" / hashlib.sha256(where.uri.encode()).hexdigest()[:24]
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(where.read_bytes() if where.is_file() else b"")

    def publish() -> None:
        if not where.is_local:
            handler.flush()
            write_atomic(where, lambda tmp: tmp.write_bytes(local.read_bytes()))

    handler = logging.FileHandler(local)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    engine_log = logging.getLogger("engine")
    engine_log.addHandler(handler)
    if engine_log.getEffectiveLevel() > logging.INFO:
        engine_log.setLevel(logging.INFO)
    try:
        yield publish
    finally:
        engine_log.removeHandler(handler)
        handler.close()
        publish()


def _run_chain(trial: Trial, generations: int, out: Location, report: Reporter | None,
               publish: Callable[[], None], fit_callbacks: tuple, step: _Step) -> None:
    family = family_for(trial)
    strategy = strategies.resolve(trial.strategy, trial.workflow)
    run = RunLayout(out)
    paths = run.chain(trial.trial_id)

    mismatch = recorded_trial_mismatch(out, trial)
    if mismatch:
        raise ChainError(f"{paths.trial_file}: this chain was run with other parameters "
                         f"({mismatch}); use another `out` or delete {paths.root}")
    if not paths.trial_file.exists():
        write_json(paths.trial_file, {**trial.to_dict(), "seed_scheme": SEED_SCHEME})
    paths.progress.remove()  # an earlier run's: not this run's progress

    # The grid point without the strategy: shared by every strategy (see module doc).
    # Only the parameters stated away from their defaults: a parameter the family gains
    # later leaves every chain's draws as they were.
    point = (trial.seed, trial.family, sorted(family.stated(trial.params).items()))
    # What a fit reads: the point without what only sampling reads (a temperature), so
    # that every chain of one model trains the same generation 1.
    fit_point = (trial.seed, trial.family, sorted(family.stated(family.fit_params()).items()))
    store = CorpusStore(paths.corpus)
    # Real data depends on the study seed alone (and on whichever parameters the family
    # says shape it), so every cell of the grid splits and tokenizes the same data.
    real = family.real_data(real_seed(trial),
                            strategy.real_chunks(generations), run.real_cache)
    T = real.train_chunks[0].num_rows
    for k, chunk in enumerate(real.train_chunks, start=1):
        if store.has(strategies.real(k)):
            continue
        if isinstance(chunk, StoredRows):  # rows of the study's prepared data: linked
            store.link(strategies.real(k), chunk)
        else:
            store.write(strategies.real(k), chunk, model="real data")
    _save_preview(family, paths.preview("real"), lambda: real.train_chunks[0])

    def sample_into(g: int, model: Any) -> None:
        """Generation g's corpus, sampled from its model and stored with its statistics.
        Generation 1's is sampled once for every chain of the study that samples the
        same model with the same seeds and as many rows, and linked into each store."""
        n, seed = strategy.sample_size(g, T), derive_seed(*point, g, "sample")
        synth = strategies.synthetic(g)

        def fill(directory: Location) -> tuple[dict[str, float], dict[str, str]]:
            # How far sampling got: what the sampler actors say they made, or the rows
            # of the files written so far, whichever is further.
            counts = paths.sample_progress(g)
            counts.remove()  # a killed attempt's counts
            with watching(trial.trial_id, g, "sampling", "stories",
                          lambda: (max(rows_sampled(counts), rows_written(directory)), n),
                          paths.progress):
                stats = family.sample_to(real, model, n, seed, directory, progress=counts)
            counts.remove()
            return stats

        def sample(into: CorpusStore) -> None:
            into.write_streamed(synth, fill, model=f"generation {g} ({family.model_name()})",
                                temperature=family.temperature())

        if g != 1 or not out.is_local:  # an object store has no lock to share it by
            sample(store)
            return
        shared = CorpusStore(run.shared_corpus(f"{derive_seed(*point, T, n, seed):016x}"))
        if not made_once(lambda: shared.has(synth), lambda: sample(shared),
                         shared.root / "LOCK"):
            log.info("%s: generation 1: its corpus was sampled by another chain (%s)",
                     trial.trial_id, shared.root)
        store.link(synth, StoredRows(shared.root.uri, synth, 0, n))

    def fit(g: int, data: Any, mix_size: Callable[[str], tuple[int, int]]) -> None:
        """Generation g's model into models/gen-g. Generation 1 trains on the real data
        alone: it is fit once for every chain whose fit reads the same, and copied."""
        def train(into: Location) -> None:
            # Scratch space of this chain and generation only, in the run's storage. It
            # survives a killed run: what a fit left there (Ray Train's checkpoints) is
            # the family's to resume from. It goes once the model is saved.
            step.phase = "reading the training mix"
            mix = data()
            step.phase = "fit"
            workdir = paths.scratch(g)
            workdir.mkdir()
            progress = paths.fit_progress(g)
            with watching(trial.trial_id, g, "fit", "steps", lambda: fit_steps(progress),
                          paths.progress):
                trained = family.fit(real, mix, derive_seed(*fit_point, g, "fit"),
                                     FitContext(workdir=workdir, callbacks=fit_callbacks,
                                                progress=progress, mix_size=mix_size,
                                                previous_model=paths.model(g - 1)
                                                if g > 1 else None))
            write_directory(into, lambda d: family.save_model(trained, d))
            workdir.remove()

        if g != 1 or not out.is_local:  # an object store has no lock to share it by
            train(paths.model(g))
            return
        shared = run.shared_model(f"{derive_seed(*fit_point, T, 'generation 1'):016x}")
        if not made_once(lambda: directory_complete(shared), lambda: train(shared),
                         shared.parent / f"{shared.name}.lock"):
            log.info("%s: generation 1: its model was fit by another chain (%s)",
                     trial.trial_id, shared)
        copy_directory(shared, paths.model(g))

    def compare(g: int, model: Any) -> tuple[dict[str, float], dict[str, dict]]:
        """The family's measures of generation g against generation 1 and the real data,
        on its corpus where it was sampled."""
        synth = strategies.synthetic(g)
        return family.compare(
            real, lambda: model if g == 1 else family.load_model(paths.model(1)), model,
            CorpusView(store, synth) if store.has(synth) else None)

    for g in range(1, generations + 1):
        if paths.metrics(g).exists():
            continue
        model_dir = paths.model(g)
        timings: dict[str, float] = {}
        start = time.perf_counter()
        step.generation, step.phase = g, "fit"
        if directory_complete(model_dir):
            model = family.load_model(model_dir)
            log.info("%s: generation %d: model loaded from checkpoint", trial.trial_id, g)
        else:
            step.phase = "reading the training mix"
            mix = strategy.mix(g, T)
            # A corpus the user deleted to have it made again, or the last generation's,
            # not sampled then (sample_last), now that the study was extended.
            for part in mix.parts:
                if part.source.kind == "synthetic" and not store.has(part.source):
                    k = part.source.index
                    if not directory_complete(paths.model(k)):
                        raise ChainError(f"{paths.corpus / part.source.name} is missing and "
                                         f"generation {k}'s model too: delete {paths.root} "
                                         "to run the chain again from the start")
                    log.info("%s: sampling corpus %s from generation %d's model (deleted, or "
                             "not sampled when generation %d was the last)", trial.trial_id,
                             part.source.name, k, k)
                    model_k = family.load_model(paths.model(k))
                    sample_into(k, model_k)
                    compared, histograms = compare(k, model_k)
                    _add_sample_stats(paths.metrics(k),
                                      {**store.entry(part.source).stats, **compared}, histograms)
            seed = derive_seed(*point, g, "mix")
            view = family.data_view()
            fit(g, lambda: store.read(mix, seed) if view == "table" else
                store.stream(mix, seed) if view == "stream" else
                store.dataset(mix, seed, shuffle_files=True),
                lambda column: store.mix_size(mix, seed, column))
            # Go on from the checkpoint, as a resumed run would: both see the same model.
            model = family.load_model(model_dir)
            timings["fit"] = time.perf_counter() - start

        start = time.perf_counter()
        step.phase = "evaluation"
        scores = dict(family.evaluate(real, model))
        expected = family.theory(trial.strategy, g)
        if expected is not None:
            scores["theory"] = expected
        timings["evaluate"] = time.perf_counter() - start

        start = time.perf_counter()
        step.phase = "sampling"
        synth = strategies.synthetic(g)
        # The last generation's corpus would train nothing: sampled only when the study
        # asks (sample_last); a study extended later samples it then (see above).
        if g < generations or trial.sample_last:
            if not store.has(synth):
                sample_into(g, model)
                timings["sample"] = time.perf_counter() - start
            scores.update(store.entry(synth).stats)
            _save_preview(family, paths.preview(synth.name), lambda: store.head(synth, 16))

        start = time.perf_counter()
        step.phase = "comparing with generation 1 and the real data"
        compared, histograms = compare(g, model)
        scores.update(compared)
        if compared or histograms:
            timings["compare"] = time.perf_counter() - start

        curves = {name: [[int(step), float(v)] for step, v in curve]
                  for name, curve in family.curves(model).items()}
        # Timings stay out of `metrics`: they differ between runs, the table must not.
        write_json(paths.metrics(g), {"generation": g, "metrics": scores, "curves": curves,
                                      "histograms": histograms, "seconds": timings})
        log.info("%s: generation %d/%d done (%s)", trial.trial_id, g, generations,
                 ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
        publish()
        if report is not None:
            report(g, scores)


def _add_sample_stats(metrics_file: Location, stats: dict[str, float],
                      histograms: dict[str, dict]) -> None:
    """A generation recorded without its corpus's statistics (it was the last, and not
    sampled) gets them, and the measures on its corpus, once its corpus is sampled: the
    table then equals the one a study run this long from the start gives."""
    if not metrics_file.exists():
        return
    record = json.loads(metrics_file.read_text())
    if all(k in record["metrics"] for k in stats) and \
            all(k in record.get("histograms", {}) for k in histograms):
        return
    record["metrics"].update(stats)
    record.setdefault("histograms", {}).update(histograms)
    write_json(metrics_file, record)


def _save_preview(family, path: Location, rows: Callable[[], Any]) -> None:
    """A few samples as images, for `collapse plot`'s grids: only for families that
    draw previews (the image families; a family's preview may also decline with None),
    and only once per corpus."""
    if not family.has_previews or path.exists():
        return
    images = family.preview(rows())
    if images is None:
        return
    import numpy as np

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(images, dtype=np.float32))

    write_atomic(path, save)


def read_metrics(out: Location | Path | str, trial: Trial, generations: int,
                 first: int = 1) -> list[dict[str, Any]]:
    """The recorded metrics of one chain, generation by generation from `first`."""
    paths = chain_layout(out, trial)
    rows = []
    for g in range(first, generations + 1):
        if not paths.metrics(g).exists():
            break
        rows.append(json.loads(paths.metrics(g).read_text()))
    return rows
