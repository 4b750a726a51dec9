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
strategies in the table are the strategies' doing, not the noise's. They leave out, for
the same reason, the parameters only the fits after generation 1 read (a `loss`, a
warm `start`): chains that differ in those share generation 1's model and corpus and
draw the same numbers after.
"""
from __future__ import annotations

import hashlib
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from engine import strategies
from engine.errors import CollapseError
from engine.corpus import CorpusStore, CorpusView, StoredRows, rows_written
from engine.families import family_for
from engine.files import (Location, copy_directory, directory_complete, made_once,
                          node_cache, write_atomic, write_directory)
from engine.fit import FitContext
from engine.layout import ChainLayout, RunLayout
from engine.records import (DamagedFile, directory_problem, intact_record, read_record,
                            write_record)
from engine.progress import fit_steps, rows_sampled, watching
from engine.seeds import derive_seed
from engine.spec import Trial

log = logging.getLogger("engine.chain")
# How a chain's random draws are derived (recorded in trial.json): 3 = from the study
# seed and the parameters stated away from their defaults but those only later fits
# read (2: every parameter stated; 1: every parameter). A chain recorded otherwise is
# not resumed (its later generations would draw other numbers).
SEED_SCHEME = 3

class ChainError(CollapseError, RuntimeError):
    """A chain stopped, said in one line: the chain, the generation, the step, the cause
    and where its log is. `retry`: whether running the chain again may help (a lost node
    or worker) or not (bad data, a corrupt corpus, a wrong parameter: the user acts first)."""

    exit_code = 1

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
    recorded = intact_record(path)
    if recorded is None:  # none yet, or damaged: the chain writes it again from the study
        return None
    if recorded.get("seed_scheme") != SEED_SCHEME:
        return (f"made by an earlier engine, which derived the chain's random draws "
                f"otherwise (seed scheme {recorded.get('seed_scheme', 1)}, this engine's "
                f"{SEED_SCHEME}); its generations cannot be continued with the same draws")
    mine = trial.to_dict()
    diffs = [f"{k}: {recorded.get(k)!r} on disk, {mine[k]!r} now"
             for k in ("family", "strategy", "seed", "workflow") if recorded.get(k) != mine[k]]
    for k in sorted(set(recorded.get("params", {})) | set(mine["params"])):
        a, b = recorded.get("params", {}).get(k), mine["params"].get(k)
        if a != b:
            diffs.append(f"family.{k}: {a!r} on disk, {b!r} now")
    return "; ".join(diffs) or None


def completed_generations(out: Location | Path | str, trial: Trial) -> int:
    """Generations whose metrics are on record, intact (a damaged one is done again)."""
    paths = chain_layout(out, trial)
    g = 0
    while intact_record(paths.metrics(g + 1)) is not None:
        g += 1
    return g


def run_chain(trial: Trial, generations: int, out: Location | Path | str,
              fit_callbacks: tuple = ()) -> None:
    """Run (or resume) one chain up to `generations`. What the engine logs meanwhile is
    appended to the chain's own chain.log (its driver may run on any node of a cluster,
    where nobody reads the worker's stderr). `fit_callbacks` go to the RunConfig of every
    Ray Train fit the chain starts (its Tune trial's TuneReportCallback); Tune learns of
    each generation from its metrics file (engine/sweep.py)."""
    paths = chain_layout(out, trial)
    paths.root.mkdir()
    step = _Step()
    with _chain_log(paths.log_file) as publish:
        try:
            chain = Chain(trial, generations, Location.of(out), tuple(fit_callbacks), step)
            chain.repair()
            for g in range(1, generations + 1):
                if not chain.done(g):
                    chain.generation(g)
                    publish()
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


class SharedFirst:
    """Generation 1's model and corpus, made once for every chain of the study that
    needs the same ones: the first chain to reach one makes it under `out/shared/`, the
    others wait for it (a lock file) and take it. Generation 1 trains on the real data
    alone, so its model depends only on what a fit reads (not the strategy, not the
    temperature), and its corpus on the model, the seeds and how many stories. An
    object store has no lock to share by: there each chain makes its own."""

    def __init__(self, run: RunLayout):
        self.run = run
        self.enabled = run.out.is_local

    def model(self, key: str, make: Callable[[Location], None], into: Location,
              trial_id: str) -> None:
        """Generation 1's model into `into`, made by `make(directory)` once."""
        if not self.enabled:
            make(into)
            return
        shared = self.run.shared_model(key)
        if not made_once(lambda: directory_complete(shared), lambda: make(shared),
                         shared.parent / f"{shared.name}.lock"):
            log.info("%s: generation 1: its model was fit by another chain (%s)",
                     trial_id, shared)
        copy_directory(shared, into)

    def corpus(self, key: str, source, rows: int, make: Callable[[CorpusStore], None],
               store: CorpusStore, trial_id: str) -> None:
        """Generation 1's corpus linked into `store`, made by `make(store)` once."""
        if not self.enabled:
            make(store)
            return
        shared = CorpusStore(self.run.shared_corpus(key))
        if not made_once(lambda: shared.has(source), lambda: make(shared),
                         shared.root / "LOCK"):
            log.info("%s: generation 1: its corpus was sampled by another chain (%s)",
                     trial_id, shared.root)
        store.link(source, StoredRows(shared.root.uri, source, 0, rows))


class Chain:
    """One chain's state (its family, strategy, files, real data, seeds) and the steps
    of a generation, in the order of DESIGN's data flow."""

    def __init__(self, trial: Trial, generations: int, out: Location, fit_callbacks: tuple,
                 step: _Step):
        self.trial, self.generations, self.step = trial, generations, step
        self.family = family_for(trial)
        self.strategy = strategies.resolve(trial.strategy, trial.workflow)
        self.run = RunLayout(out)
        self.paths = self.run.chain(trial.trial_id)
        self.fit_callbacks = fit_callbacks
        self.shared = SharedFirst(self.run)
        mismatch = recorded_trial_mismatch(out, trial)
        if mismatch:
            raise ChainError(f"{self.paths.trial_file}: this chain was run with other "
                             f"parameters ({mismatch}); use another `out` or delete "
                             f"{self.paths.root}")
        if intact_record(self.paths.trial_file) is None:
            if self.paths.trial_file.exists():
                log.warning("%s: damaged; written again from the study (the chain's "
                            "directory names its parameters)", self.paths.trial_file)
            write_record(self.paths.trial_file, {**trial.to_dict(), "seed_scheme": SEED_SCHEME})
        self.paths.progress.remove()  # an earlier run's: not this run's progress
        family = self.family
        # The grid point without the strategy: shared by every strategy (see module doc),
        # and without what only later fits read (family.draw_params).
        # Only the parameters stated away from their defaults: a parameter the family
        # gains later leaves every chain's draws as they were.
        self.point = (trial.seed, trial.family,
                      sorted(family.stated(family.draw_params(trial.params)).items()))
        # What a fit reads: the point without what only sampling reads (a temperature),
        # so that every chain of one model trains the same generation 1.
        self.fit_point = (trial.seed, trial.family,
                          sorted(family.stated(family.fit_params()).items()))
        self.store = CorpusStore(self.paths.corpus)
        # Real data depends on the study seed alone (and on whichever parameters the
        # family says shape it), so every cell of the grid splits the same data.
        self.real = family.real_data(real_seed(trial),
                                     self.strategy.real_chunks(generations),
                                     self.run.real_cache)
        self.T = self.real.train_chunks[0].num_rows
        self._link_real()

    def _link_real(self) -> None:
        for k, chunk in enumerate(self.real.train_chunks, start=1):
            if self.store.has(strategies.real(k)):
                continue
            if isinstance(chunk, StoredRows):  # rows of the study's prepared data: linked
                self.store.link(strategies.real(k), chunk)
            else:
                self.store.write(strategies.real(k), chunk, model="real data")
        _save_preview(self.family, self.paths.preview("real"),
                      lambda: self.real.train_chunks[0])

    # ------------------------------------------------------------ what is on record
    def done(self, g: int) -> bool:
        """Whether generation g's metrics are on record. A damaged record (edited, cut
        short) is named and removed: the generation is recomputed from its model and
        corpus, which are checked in turn."""
        where = self.paths.metrics(g)
        if not where.exists():
            return False
        try:
            read_record(where)
            return True
        except DamagedFile as e:
            log.warning("%s; generation %d is recomputed from its model and corpus", e, g)
            where.remove()
            return False

    def model(self, k: int):
        """Generation k's saved model, checked against its checksums."""
        problem = directory_problem(self.paths.model(k))
        if problem:
            raise ChainError(f"{problem}; delete {self.paths.model(k)} and every later "
                             f"generation's files to fit generation {k} again")
        return self.family.load_model(self.paths.model(k))

    # ------------------------------------------------------------ before the loop
    def repair(self) -> None:
        """Corpora that the generations still to fit read but the store lacks: deleted
        by the user to have them made again, or a finished generation's that was the
        last and not sampled (sample_last), now that the study was extended. Each is
        sampled again from its generation's model, with the same seeds."""
        paths = self.paths
        for g in range(1, self.generations + 1):
            if paths.metrics(g).exists() or directory_complete(paths.model(g)):
                continue
            for part in self.strategy.mix(g, self.T).parts:
                k = part.source.index
                if part.source.kind != "synthetic" or not paths.metrics(k).exists() \
                        or self.store.has(part.source):
                    continue
                if not directory_complete(paths.model(k)):
                    raise ChainError(f"{paths.corpus / part.source.name} is missing and "
                                     f"generation {k}'s model too: delete {paths.root} "
                                     "to run the chain again from the start")
                log.info("%s: sampling corpus %s from generation %d's model (deleted, or "
                         "not sampled when generation %d was the last)", self.trial.trial_id,
                         part.source.name, k, k)
                self.step.generation, self.step.phase = k, "sampling (a repair)"
                model = self.model(k)
                self.sample(k, model)
                compared, histograms = self.compare(k, model)
                _add_sample_stats(paths.metrics(k),
                                  {**self.store.entry(part.source).stats, **compared},
                                  histograms)

    # ------------------------------------------------------------ one generation
    def generation(self, g: int) -> None:
        """mix, fit, evaluate, sample, store, compare, record."""
        timings: dict[str, float] = {}
        self.step.generation = g
        model = self.fit(g, timings)
        with _timed(timings, "evaluate", self.step, "evaluation"):
            scores = dict(self.family.evaluate(self.real, model))
            expected = self.family.theory(self.trial.strategy, g)
            if expected is not None:
                scores["theory"] = expected
        synth = strategies.synthetic(g)
        # The last generation's corpus would train nothing: sampled only when the study
        # asks (sample_last); a study extended later samples it then (repair).
        if g < self.generations or self.trial.sample_last:
            if not self.store.has(synth):
                with _timed(timings, "sample", self.step, "sampling"):
                    self.sample(g, model)
            scores.update(self.store.entry(synth).stats)
            _save_preview(self.family, self.paths.preview(synth.name),
                          lambda: self.store.head(synth, 16))
        with _timed(timings, "compare", self.step,
                    "comparing with generation 1 and the real data"):
            compared, histograms = self.compare(g, model)
            scores.update(compared)
        if not (compared or histograms):
            timings.pop("compare")
        self.record(g, model, scores, histograms, timings)

    def fit(self, g: int, timings: dict[str, float]):
        """Generation g's model: trained on the strategy's mix into models/gen-g (the
        checkpoint a resumed run goes on from), or loaded from it."""
        model_dir = self.paths.model(g)
        self.step.phase = "fit"
        if directory_complete(model_dir):
            problem = directory_problem(model_dir)
            if problem is None:
                log.info("%s: generation %d: model loaded from checkpoint",
                         self.trial.trial_id, g)
                return self.family.load_model(model_dir)
            # Its inputs (the mix's corpora) are checked when read: fit it again.
            log.warning("%s; generation %d is fit again from its mix", problem, g)
            model_dir.remove()
        with _timed(timings, "fit", self.step, "reading the training mix"):
            mix = self.strategy.mix(g, self.T)
            seed = derive_seed(*self.point, g, "mix")
            if g == 1:
                key = f"{derive_seed(*self.fit_point, self.T, 'generation 1'):016x}"
                self.shared.model(key, lambda into: self._train(g, mix, seed, into),
                                  model_dir, self.trial.trial_id)
            else:
                self._train(g, mix, seed, model_dir)
            # Go on from the checkpoint, as a resumed run would: both see the same model.
            return self.family.load_model(model_dir)

    def _train(self, g: int, mix, seed: int, into: Location) -> None:
        """A fit of the mix into the model directory `into`. Its scratch space (this
        chain and generation only, in the run's storage) survives a killed run: what a
        fit left there (Ray Train's checkpoints) is the family's to resume from. It goes
        once the model is saved."""
        view, store = self.family.data_view(), self.store
        unit = self.family.weight_unit
        data = (store.read(mix, seed) if view == "table" else
                store.stream(mix, seed, weight_unit=unit) if view == "stream" else
                store.dataset(mix, seed, shuffle_files=True, weight_unit=unit))
        self.step.phase = "fit"
        workdir, progress = self.paths.scratch(g), self.paths.fit_progress(g)
        workdir.mkdir()
        context = FitContext(workdir=workdir, callbacks=self.fit_callbacks, progress=progress,
                             mix_size=lambda column: store.mix_size(mix, seed, column),
                             weighted=mix.weights is not None,
                             previous_model=self.paths.model(g - 1) if g > 1 else None)
        with watching(self.trial.trial_id, g, "fit", "steps", lambda: fit_steps(progress),
                      self.paths.progress):
            trained = self.family.fit(self.real, data,
                                      derive_seed(*self.fit_point, g, "fit"), context)
        write_directory(into, lambda d: self.family.save_model(trained, d))
        workdir.remove()

    def sample(self, g: int, model: Any) -> None:
        """Generation g's corpus, sampled from its model and stored with its statistics
        (generation 1's once for every chain that samples the same)."""
        n, seed = self.strategy.sample_size(g, self.T), derive_seed(*self.point, g, "sample")
        synth = strategies.synthetic(g)

        def fill(directory: Location) -> tuple[dict[str, float], dict[str, str]]:
            # How far sampling got: what the sampler actors say they made, or the rows
            # of the files written so far, whichever is further.
            counts = self.paths.sample_progress(g)
            counts.remove()  # a killed attempt's counts
            with watching(self.trial.trial_id, g, "sampling", "stories",
                          lambda: (max(rows_sampled(counts), rows_written(directory)), n),
                          self.paths.progress):
                stats = self.family.sample_to(self.real, model, n, seed, directory,
                                              progress=counts)
            counts.remove()
            return stats

        def make(into: CorpusStore) -> None:
            into.write_streamed(synth, fill, temperature=self.family.temperature(),
                                model=f"generation {g} ({self.family.model_name()})")

        if g == 1:
            key = f"{derive_seed(*self.point, self.T, n, seed):016x}"
            self.shared.corpus(key, synth, n, make, self.store, self.trial.trial_id)
        else:
            make(self.store)

    def compare(self, g: int, model: Any) -> tuple[dict[str, float], dict[str, dict]]:
        """The family's measures of generation g against generation 1 and the real data,
        on its corpus where it was sampled."""
        synth = strategies.synthetic(g)
        first = (lambda: model) if g == 1 else (lambda: self.model(1))
        return self.family.compare(self.real, first, model,
                                   CorpusView(self.store, synth) if self.store.has(synth)
                                   else None)

    def record(self, g: int, model: Any, scores: dict[str, float],
               histograms: dict[str, dict], timings: dict[str, float]) -> None:
        """metrics/gen-g.json: marks generation g done."""
        curves = {name: [[int(step), float(v)] for step, v in curve]
                  for name, curve in self.family.curves(model).items()}
        # Timings stay out of `metrics`: they differ between runs, the table must not.
        write_record(self.paths.metrics(g), {"generation": g, "metrics": scores,
                                             "curves": curves, "histograms": histograms,
                                             "seconds": timings})
        log.info("%s: generation %d/%d done (%s)", self.trial.trial_id, g, self.generations,
                 ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))


@contextmanager
def _timed(timings: dict[str, float], name: str, step: _Step, phase: str) -> Iterator[None]:
    """Time a phase of a generation into `timings[name]`, saying where the chain is."""
    step.phase = phase
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = time.perf_counter() - start


def _add_sample_stats(metrics_file: Location, stats: dict[str, float],
                      histograms: dict[str, dict]) -> None:
    """A generation recorded without its corpus's statistics (it was the last, and not
    sampled) gets them, and the measures on its corpus, once its corpus is sampled: the
    table then equals the one a study run this long from the start gives."""
    if not metrics_file.exists():
        return
    record = read_record(metrics_file)
    if all(k in record["metrics"] for k in stats) and \
            all(k in record.get("histograms", {}) for k in histograms):
        return
    record["metrics"].update(stats)
    record.setdefault("histograms", {}).update(histograms)
    write_record(metrics_file, record)


def _save_preview(family, path: Location, rows: Callable[[], Any]) -> None:
    """A few samples as images, for `collapse plot`'s grids: only for families that
    draw previews (the image families; a family's preview may also decline with None),
    and only once per corpus."""
    previews = family.presentation.previews
    if previews is None or path.exists():
        return
    images = previews(family, rows())
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
        rows.append(read_record(paths.metrics(g)))
    return rows
