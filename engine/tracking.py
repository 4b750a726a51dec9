"""Experiment tracking through Ray Tune's own logger callbacks.

A study's `tracking:` block turns on any of:

    tracking:
      mlflow: file:///abs/mlruns    # Ray's MLflowLoggerCallback: a file store, a server
                                    # (http://host:5000) or `databricks`
      wandb: my-project             # Ray's WandbLoggerCallback; WANDB_MODE=offline honoured

One tracked run per chain, named by the chain (`accumulate__seed=0`), tagged with the
study, strategy, seed and grid point, its family parameters as the run's parameters;
every generation's metrics are logged at step = generation. When the study ends, the
resolved study file and the tidy table (results.parquet) are attached to every run of
it as artifacts. TensorBoard needs no setting: Tune writes event files for every chain
(`tune/sweep/<chain>/events.out.tfevents.*`; `tensorboard --logdir OUT/tune/sweep`).

A run's steps are generations. Beside each generation's metrics the trackers get its
fit's per-step curves (train_loss by step, from the generation's metrics record): in
MLflow as the metric `<curve>/generation-<g>` with the fit's steps as its steps, in W&B
as a table `curves/<curve>` (columns step, value) logged at that generation. A chain
resumed in a later `collapse run` continues its tracked run: MLflow finds the run by
the study's and chain's tags, W&B by its id (the study and chain names).

Neither package is a dependency of the engine: `pip install -e '.[tracking]'`.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.layout import RunLayout
    from engine.spec import Study

EXTRA = "pip install -e '.[tracking]'"
NEEDS = {"mlflow": "mlflow", "wandb": "wandb"}  # tracking key -> the module it imports


def missing_package(key: str) -> str | None:
    """The module a tracker needs, if it is not installed."""
    import importlib.util

    module = NEEDS[key]
    return None if importlib.util.find_spec(module) else module


# What Tune adds to every result: bookkeeping, not the chain's metrics.
_TUNE_KEYS = {"generation", "training_iteration", "time_this_iter_s", "time_total_s",
              "timestamp", "pid", "time_since_restore", "iterations_since_restore",
              "done", "checkpoint_dir_name", "trial_id", "date", "hostname", "node_ip",
              "should_checkpoint", "config"}


def _generation_result(result: dict[str, Any]) -> dict[str, float] | None:
    """The chain's per-generation metrics from a Tune result; None for a fit's
    progress report (which carries no `generation`)."""
    if "generation" not in result:
        return None
    return {k: float(v) for k, v in result.items()
            if k not in _TUNE_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _curves(trial, result: dict[str, Any]) -> dict[str, list[list[float]]]:
    """The per-step curves of the fit of the generation `result` reports, from the
    chain's metrics record on disk ({} if it has none or cannot be read: tracking never
    stops a study)."""
    from engine.layout import RunLayout
    from engine.records import read_record

    try:
        chain = RunLayout.of(trial.config["out"]).chain(trial.config["trial"]["trial_id"])
        return read_record(chain.metrics(int(result["generation"]))).get("curves", {})
    except Exception:  # noqa: BLE001 — missing or damaged: the chain's to report
        return {}


def _tags(study: "Study", chain: dict[str, Any]) -> dict[str, str]:
    return {"study": study.name, "chain": chain["trial_id"], "family": chain["family"],
            "strategy": chain["strategy"], "seed": str(chain["seed"]),
            **{f"axis.{k}": str(v) for k, v in chain["axes"].items()}}


def _params(chain: dict[str, Any]) -> dict[str, Any]:
    return {"strategy": chain["strategy"], "seed": chain["seed"],
            "generations": chain["generations"], **chain["params"]}


def check(study: "Study") -> None:
    """Reach the trackers before Ray starts: a store that cannot be opened is one line
    (SpecError naming tracking.<key>), not a traceback from inside Tune."""
    from engine.errors import SpecError

    if study.tracking.mlflow:
        if study.tracking.mlflow.startswith("file:"):
            # MLflow 3 keeps its file store only on request; a local store is what a
            # researcher without a tracking server has.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            import mlflow

            mlflow.MlflowClient(tracking_uri=study.tracking.mlflow).search_experiments(
                max_results=1)
        except Exception as e:  # noqa: BLE001 — MLflow raises many kinds
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SpecError(f"{study.source}: tracking.mlflow: cannot open "
                            f"{study.tracking.mlflow}: {first}") from None


def callbacks(study: "Study") -> list:
    """The Tune callbacks the study's `tracking:` block asks for."""
    out = []
    if study.tracking.mlflow:
        out.append(_mlflow_callback(study))
    if study.tracking.wandb:
        out.append(_wandb_callback(study))
    return out


def _mlflow_callback(study: "Study"):
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    class ChainsToMLflow(MLflowLoggerCallback):
        """Ray's callback, with a run per chain named and tagged by the chain, and the
        chain's generations as its steps."""

        def log_trial_start(self, trial) -> None:
            chain = trial.config["trial"]
            if trial in self._trial_runs:
                return
            earlier = self._earlier_run(chain["trial_id"])
            if earlier is not None:  # a resumed chain: its run goes on
                self._trial_runs[trial] = earlier
                self._client().update_run(earlier, status="RUNNING")
                return
            run = self.mlflow_util.start_run(tags=_tags(study, chain),
                                             run_name=chain["trial_id"])
            self._trial_runs[trial] = run.info.run_id
            self.mlflow_util.log_params(run_id=self._trial_runs[trial],
                                        params_to_log=_params(chain))

        def _client(self):
            import mlflow

            return mlflow.MlflowClient(tracking_uri=study.tracking.mlflow)

        def _earlier_run(self, chain_id: str) -> str | None:
            """The run an earlier `collapse run` of this study kept for the chain."""
            quoted = chain_id.replace("'", "\\'")
            name = study.name.replace("'", "\\'")
            found = self._client().search_runs(
                [self.mlflow_util.experiment_id], max_results=1,
                filter_string=f"tags.chain = '{quoted}' and tags.study = '{name}'",
                order_by=["attributes.start_time DESC"])
            return found[0].info.run_id if found else None

        def log_trial_result(self, iteration: int, trial, result: dict) -> None:
            metrics = _generation_result(result)
            if not metrics:
                return
            g = int(result["generation"])
            self.mlflow_util.log_metrics(run_id=self._trial_runs[trial],
                                         metrics_to_log=metrics, step=g)
            for name, curve in _curves(trial, result).items():
                for step, value in curve:
                    self.mlflow_util.log_metrics(
                        run_id=self._trial_runs[trial], step=int(step),
                        metrics_to_log={f"{name}/generation-{g}": float(value)})

        def log_trial_end(self, trial, failed: bool = False) -> None:
            self.runs[trial.config["trial"]["trial_id"]] = self._trial_runs[trial]
            super().log_trial_end(trial, failed)

    callback = ChainsToMLflow(tracking_uri=study.tracking.mlflow, experiment_name=study.name)
    callback.runs = {}  # chain id -> MLflow run id, for the artifacts at the end
    return callback


def _wandb_callback(study: "Study"):
    from ray.air.integrations.wandb import WandbLoggerCallback

    class ChainsToWandb(WandbLoggerCallback):
        """Ray's callback, with a run per chain named and tagged by the chain, its
        family parameters as the run's config, and the chain's generations as steps."""

        def log_trial_start(self, trial) -> None:
            chain = trial.config["trial"]
            self._start_logging_actor(
                trial, [], id=re.sub(r"[^A-Za-z0-9_-]", "-", f"{study.name}-{chain['trial_id']}"),
                name=chain["trial_id"], group=study.name, project=self.project,
                tags=[study.name, chain["strategy"]],
                config={**_tags(study, chain), **_params(chain)},
                resume="allow", reinit=True, allow_val_change=True, dir=self.directory)

        def log_trial_result(self, iteration: int, trial, result: dict) -> None:
            metrics = _generation_result(result)
            if metrics:
                import wandb

                # Each fit's curve as a table at its generation: W&B has one step per
                # run, and here that is the generation.
                curves = {f"curves/{name}": wandb.Table(columns=["step", name], data=curve)
                          for name, curve in _curves(trial, result).items() if curve}
                # The logging actor steps W&B by `training_iteration`: the generation.
                super().log_trial_result(iteration, trial, {
                    **metrics, **curves, "training_iteration": int(result["generation"])})

    callback = ChainsToWandb(project=study.tracking.wandb)
    callback.directory = str(wandb_directory(study))
    Path(callback.directory).mkdir(parents=True, exist_ok=True)
    return callback


def wandb_directory(study: "Study") -> Path:
    """Where W&B keeps its run files (offline runs, until `wandb sync`): the run's
    `tracking/` when `out` is a local directory, else the current one."""
    from engine.files import Location

    out = Location.of(study.out)
    return (out.local_path.resolve() / "tracking") if out.is_local else Path(os.getcwd())


def attach_results(study: "Study", trackers: list, run: "RunLayout") -> None:
    """Attach the run's study file and tidy table to every tracked run of this study
    (local copies first: `out` may be an object store)."""
    import tempfile

    if not trackers:
        return
    with tempfile.TemporaryDirectory(prefix="collapse-artifacts-") as d:
        files = [Path(d) / "study.yaml", Path(d) / "results.parquet"]
        files[0].write_bytes(run.study_file.read_bytes())
        files[1].write_bytes(run.results_table.read_bytes())
        for callback in trackers:
            _attach(study, callback, files)


def _attach(study: "Study", callback, files: list[Path]) -> None:
    if hasattr(callback, "runs"):  # MLflow: runs are closed; the client adds to them
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=study.tracking.mlflow)
        for run_id in callback.runs.values():
            for f in files:
                client.log_artifact(run_id, str(f))
    elif hasattr(callback, "directory"):  # W&B: one more run, of the study itself
        import wandb

        run = wandb.init(project=study.tracking.wandb, group=study.name,
                         name=f"{study.name} results", job_type="results",
                         dir=callback.directory, reinit=True)
        artifact = wandb.Artifact(f"{study.name}-results", type="results")
        for f in files:
            artifact.add_file(str(f))
        run.log_artifact(artifact)
        run.finish()
