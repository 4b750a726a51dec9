"""Where every file of a run lives — the only place that spells a run's paths.

    <out>/
      study.yaml                       the resolved study of the last run
      runs.json                        each run's facts: when, versions, hardware (the report's)
      report.html                      collapse report
      results.parquet, results.csv     the tidy table
      plots/                           collapse plot
      real/                            real data prepared once per study (LM: split, tokenizer, tokens)
      shared/models/<key>/             a generation-1 model fit once for every chain that reads the same
      shared/corpora/<key>/            a generation-1 corpus sampled once for every chain that samples it
      tune/                            Ray Tune's own experiment records
      trials/<chain>/
        trial.json                     the chain's parameters
        chain.log                      what the chain's driver logged
        progress.json                  how far the running fit or sampling got (engine/progress.py)
        corpus/                        the corpus store (engine/corpus.py)
        models/gen-NNNN/               the generation's model
        metrics/gen-NNNN.json          marks generation NNNN done
        previews/<corpus>.npy          a few samples of a corpus, for image families
        scratch/gen-NNNN/              the fit in progress (Ray Train's checkpoints, progress.json)
        scratch/gen-NNNN-sampling/     each sampler actor's count of the stories it made

`out` is a path or an object-store URI (engine/files/); every name here is a Location.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.files import Location


def _gen(g: int) -> str:
    return f"gen-{g:04d}"


@dataclass(frozen=True)
class ChainLayout:
    """One chain's files."""

    root: Location

    @property
    def trial_file(self) -> Location:
        return self.root / "trial.json"

    @property
    def log_file(self) -> Location:
        return self.root / "chain.log"

    @property
    def corpus(self) -> Location:
        return self.root / "corpus"

    @property
    def previews(self) -> Location:
        return self.root / "previews"

    def preview(self, corpus: str) -> Location:
        return self.previews / f"{corpus}.npy"

    def model(self, g: int) -> Location:
        return self.root / "models" / _gen(g)

    def metrics(self, g: int) -> Location:
        return self.root / "metrics" / f"{_gen(g)}.json"

    def scratch(self, g: int) -> Location:
        return self.root / "scratch" / _gen(g)

    @property
    def progress(self) -> Location:
        return self.root / "progress.json"

    def fit_progress(self, g: int) -> Location:
        """Where the fit of generation g writes how far it got (its rank 0)."""
        return self.scratch(g) / "progress.json"

    def sample_progress(self, g: int) -> Location:
        """The directory where generation g's sampler actors write how far they got."""
        return self.root / "scratch" / f"{_gen(g)}-sampling"


@dataclass(frozen=True)
class RunLayout:
    """A study's run directory."""

    out: Location

    @staticmethod
    def of(out: "Location | Path | str") -> "RunLayout":
        return RunLayout(Location.of(out))

    @property
    def study_file(self) -> Location:
        return self.out / "study.yaml"

    @property
    def run_facts(self) -> Location:
        return self.out / "runs.json"

    @property
    def report(self) -> Location:
        return self.out / "report.html"

    @property
    def results_table(self) -> Location:
        return self.out / "results.parquet"

    @property
    def results_csv(self) -> Location:
        return self.out / "results.csv"

    @property
    def plots(self) -> Location:
        return self.out / "plots"

    @property
    def tune(self) -> Location:
        return self.out / "tune"

    @property
    def trials(self) -> Location:
        return self.out / "trials"

    def chain(self, trial_id: str) -> ChainLayout:
        return ChainLayout(self.trials / trial_id)

    def chains(self) -> list[ChainLayout]:
        """Every chain directory the run holds, by name."""
        return [ChainLayout(c) for c in self.trials.children()]

    def shared_model(self, key: str) -> Location:
        """A generation-1 model every chain whose fit reads the same (grid point without
        the strategy and the sampling parameters) shares."""
        return self.out / "shared" / "models" / key

    def shared_corpus(self, key: str) -> Location:
        """The store of a generation-1 corpus every chain that samples the same model
        with the same seeds and as many rows shares."""
        return self.out / "shared" / "corpora" / key

    @property
    def real_cache(self) -> Location:
        """Where families keep real data prepared once per study (a tokenizer, the
        tokenized splits), in the run's storage, where every chain on any node reads it."""
        return self.out / "real"
