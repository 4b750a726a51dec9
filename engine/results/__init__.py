"""The tidy results table and every view computed from it.

One row per trial × generation × metric:

    study, trial, family, model, strategy, temperature, seed, generation, metric, value,
    <one column per grid axis>

saved as results.parquet and results.csv in the study's output directory. Pivots and
plots read only this table, never the chains' files.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from engine.errors import BadInput, NotFound, UnknownName
from engine.records import DamagedFile, file_problem, read_record, write_file_checksum
from engine.chain import read_metrics
from engine.families import family_for, get_family
from engine.files import Location, write_atomic
from engine.layout import RunLayout
from engine.spec import Study, axis_label

FIXED_COLUMNS = ["study", "trial", "family", "model", "strategy", "temperature", "seed",
                 "generation", "metric", "value", "step"]  # step: for per-step curves only


def collect(study: Study) -> pd.DataFrame:
    """Gather every chain's recorded metrics into the tidy table."""
    rows = []
    for trial in study.trials():
        family = family_for(trial)
        temperature = family.temperature()
        fixed = {"study": study.name, "trial": trial.trial_id, "family": study.family,
                 "model": family.model_name(), "strategy": trial.strategy,
                 "temperature": float("nan") if temperature is None else temperature,
                 "seed": trial.seed}
        # A list- or mapping-valued axis (an image family's `widths`, the LM's `curate`
        # or `loss`) is written as its trial id writes it (spec.axis_label): pandas
        # groups and pivots strings, and a list or dict in a cell is unhashable.
        axes = {k: axis_label(v) for k, v in trial.axes.items() if k not in FIXED_COLUMNS}
        for record in read_metrics(study.out, trial, trial.generations):
            g = record["generation"]
            for metric, value in record["metrics"].items():
                rows.append({**fixed, "generation": g, "metric": metric, "value": float(value),
                             "step": pd.NA, **axes})
            for metric, curve in record.get("curves", {}).items():
                rows.extend({**fixed, "generation": g, "metric": metric, "value": float(v),
                             "step": int(step), **axes} for step, v in curve)
    # An axis that is a fixed column already (the LM's model, temperature) is that column.
    columns = FIXED_COLUMNS + [a for a in study.axes if a not in FIXED_COLUMNS]
    table = pd.DataFrame(rows, columns=columns)
    table["step"] = table["step"].astype("Int64")
    return table


def _rebuilt(run: RunLayout, problem: str) -> pd.DataFrame:
    """The table again from the chains' metrics (each checked as it is read)."""
    import sys

    from engine.spec import load_study

    if not run.study_file.exists():
        raise DamagedFile(f"{problem}; run `collapse run` on its study again to rebuild "
                          "it from the chains' metrics")
    study = load_study(run.study_file.local_path if run.out.is_local else run.study_file.uri,
                       [f"out={run.out.uri}"])
    table = collect(study)
    write(table, run.out)
    print(f"{problem}; rebuilt from the chains' metrics", file=sys.stderr)
    return table


def write(table: pd.DataFrame, out: Location | Path | str) -> None:
    run = RunLayout.of(out)
    write_atomic(run.results_table, lambda tmp: table.to_parquet(tmp, index=False))
    write_file_checksum(run.results_table)  # what load_results checks
    write_atomic(run.results_csv, lambda tmp: table.to_csv(tmp, index=False))


def load_results(directory: Location | Path | str) -> pd.DataFrame:
    """A study's tidy table, checked against its checksum. A damaged table (a flipped
    bit changes a number without a word) is rebuilt from the chains' verified metrics
    where the run's study.yaml is there, and the rebuild is said on stderr."""
    import io

    run = RunLayout.of(directory)
    path = run.results_table
    if not path.exists():
        raise NotFound(f"{path}: no results table (run the study first: "
                                "collapse run STUDY.yaml)")
    problem = file_problem(path)
    if problem:
        return _rebuilt(run, problem)
    try:
        table = pd.read_parquet(io.BytesIO(path.read_bytes()))
    except Exception as e:  # noqa: BLE001 — pyarrow raises several kinds for a bad file
        raise BadInput(f"{path}: unreadable results table ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); run `collapse run` "
                         "on its study again to rebuild it from the chains") from None
    missing = [c for c in FIXED_COLUMNS if c not in table.columns]
    if missing:
        raise BadInput(f"{path}: not a results table (no column {', '.join(missing)})")
    return table


def axis_columns(table: pd.DataFrame) -> list[str]:
    """The columns a study varies besides strategy and seed: its grid axes, the model and
    temperature columns among them when they take more than one value."""
    varied = [c for c in ("model", "temperature") if table[c].nunique(dropna=True) > 1]
    return varied + [c for c in table.columns if c not in FIXED_COLUMNS]


def headline_metric(table: pd.DataFrame) -> str:
    return get_family(table["family"].iloc[0]).metrics[0]


def check_metric(table: pd.DataFrame, metric: str) -> None:
    """KeyError naming the metrics the table has, if it has no `metric`."""
    if not (table["metric"] == metric).any():
        known = ", ".join(sorted(table["metric"].unique()))
        raise UnknownName(f"no metric {metric!r} in the table (it has: {known})")


def pivot(table: pd.DataFrame, metric: str | None = None) -> pd.DataFrame:
    """Rows: strategy × grid axes (mean over seeds); columns: generation."""
    metric = metric or headline_metric(table)
    rows = table[(table["metric"] == metric) & table["step"].isna()]
    if rows.empty:
        check_metric(table, metric)
        raise UnknownName(f"metric {metric!r} is a per-step curve; plot it with collapse plot")
    index = ["strategy"] + axis_columns(table)
    return rows.pivot_table(index=index, columns="generation", values="value",
                            aggfunc="mean", sort=False)


# ------------------------------------------------------------- seeds and intervals
# Over seeds, a cell is shown as mean ± the half-width of a 95% Student-t interval for
# the mean: t(0.975, n-1) · s / √n, s the sample standard deviation of the n seeds'
# values. Seeds are independent chains, so this is the usual interval for a mean of n
# independent draws; with 2-3 seeds it is wide (t = 12.7 and 4.3), as it should be.
CONFIDENCE = 0.95


def half_width(values: pd.Series) -> float:
    """Half-width of the 95% Student-t interval for the mean of `values` (NaN for one)."""
    from scipy import stats

    n = values.count()
    if n < 2:
        return float("nan")
    return float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * values.std(ddof=1) / n ** 0.5)


def seed_count(table: pd.DataFrame) -> int:
    return int(table["seed"].nunique())


def _with_intervals(rows: pd.DataFrame, index: list[str]) -> pd.DataFrame:
    """Rows: `index`; columns: generation; cells "mean ± half-width" over seeds."""
    cells = rows.groupby(index + ["generation"], sort=False, dropna=False)["value"] \
        .agg(["mean", half_width])
    text = [f"{m:.4g}" if pd.isna(h) else f"{m:.4g} ± {h:.2g}"
            for m, h in zip(cells["mean"], cells["half_width"])]
    out = pd.Series(text, index=cells.index).unstack("generation")
    out = out.reindex(columns=sorted(out.columns))
    return out.fillna("n/a")


def pivot_with_intervals(table: pd.DataFrame, metric: str | None = None) -> pd.DataFrame:
    """The pivot with each cell mean ± half-width of its 95% interval over seeds."""
    metric = metric or headline_metric(table)
    pivot(table, metric)  # the errors for a missing or per-step metric
    rows = table[(table["metric"] == metric) & table["step"].isna()]
    return _with_intervals(rows, ["strategy"] + axis_columns(table))


def paired_difference(table: pd.DataFrame, a: str, b: str,
                      metric: str | None = None) -> pd.DataFrame:
    """Strategy a minus strategy b, seed by seed (the two share the seed's real data and
    every random draw), then mean ± half-width over seeds: far tighter than the two
    strategies' own intervals, whose seed-to-seed spread the difference cancels."""
    metric = metric or headline_metric(table)
    pivot(table, metric)
    for s in (a, b):
        if s not in set(table["strategy"]):
            raise UnknownName(f"no strategy {s!r} in the table (it has: "
                           f"{', '.join(dict.fromkeys(table['strategy']))})")
    rows = table[(table["metric"] == metric) & table["step"].isna()]
    axes = axis_columns(table)
    keys = axes + ["seed", "generation"]
    by = rows[rows["strategy"].isin([a, b])].pivot_table(
        index=keys, columns="strategy", values="value", aggfunc="mean", dropna=False)
    diff = (by[a] - by[b]).dropna().rename("value").reset_index()
    if diff.empty:
        raise UnknownName(f"{a} and {b} share no (grid point, seed, generation) in the table")
    diff["difference"] = f"{a} - {b}"
    return _with_intervals(diff, ["difference"] + axes)


# The seed paper's Table 2: test loss at t=1, and at later generations with its change.
PAPER_CELLS = [("t=4 accumulate", "accumulate", 4), ("t=4 replace", "replace", 4),
               ("t=10 replace", "replace", 10), ("t=4 replace-multiple", "replace_multiple", 4)]


def paper_table(table: pd.DataFrame, metric: str = "test_loss") -> pd.DataFrame:
    """Rows: model × temperature (× other axes); columns: t=1, then each later cell as
    "value (Δ vs t=1)"; "n/a" where the study did not run that cell. Mean over seeds."""
    rows = table[(table["metric"] == metric) & table["step"].isna()]
    keys = ["model", "temperature"] + [c for c in axis_columns(table)
                                       if c not in ("model", "temperature")]
    out = []
    for key, group in rows.groupby(keys, sort=False, dropna=False):
        mean = group.groupby(["strategy", "generation"])["value"].mean()
        first = group[group["generation"] == 1]["value"].mean()  # same data for every strategy
        record = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
        record["t=1"] = f"{first:.3f}" if pd.notna(first) else "n/a"
        for label, strategy, generation in PAPER_CELLS:
            v = mean.get((strategy, generation))
            record[label] = "n/a" if v is None or pd.isna(first) else f"{v:.3f} ({v - first:+.3f})"
        out.append(record)
    return pd.DataFrame(out).set_index(keys)


def has_paper_table(table: pd.DataFrame, metric: str | None = None) -> bool:
    family = get_family(table["family"].iloc[0])
    return family.presentation.paper_table and metric in (None, family.metrics[0])


def summary(table: pd.DataFrame, metric: str | None = None) -> pd.DataFrame:
    """What `collapse table` prints: the family's paper layout if it has one, else the pivot."""
    if has_paper_table(table, metric):
        return paper_table(table, get_family(table["family"].iloc[0]).metrics[0])
    return pivot(table, metric)


def collapse_profile(table: pd.DataFrame, metric: str | None = None) -> tuple[str, pd.DataFrame]:
    """How the metric grows over generations per strategy × grid axes: the form with
    the lowest AICc among linear, logarithmic and bounded (engine/results/profile.py),
    with a caption saying so."""
    from engine.results.profile import profile

    metric = metric or headline_metric(table)
    pivot(table, metric)  # the errors for a missing or per-step metric
    caption = (f"collapse profile of {metric}: the growth over generations (linear, "
               "logarithmic or bounded) with the lowest AICc, fitted to the mean over "
               f"{seed_count(table)} seed(s); g is the generation")
    return caption, profile(table, metric, ["strategy"] + axis_columns(table))


def table_view(table: pd.DataFrame, metric: str | None = None, as_pivot: bool = False,
               diff: tuple[str, str] | None = None, as_profile: bool = False
               ) -> tuple[str | None, pd.DataFrame]:
    """What `collapse table` prints: a caption saying what the cells are (None for a
    single seed's values), and the view: the collapse profile, the paired difference of
    two strategies, the pivot with intervals over seeds, the family's paper layout, or
    the plain pivot."""
    if as_profile:
        return collapse_profile(table, metric)
    seeds = seed_count(table)
    if diff:
        return (f"{diff[0]} minus {diff[1]}, seed by seed: mean ± half-width of the 95% "
                f"Student-t interval over {seeds} seed(s)",
                paired_difference(table, *diff, metric=metric))
    if seeds > 1 and (as_pivot or not has_paper_table(table, metric)):
        return (f"mean ± half-width of the 95% Student-t interval over {seeds} seeds",
                pivot_with_intervals(table, metric))
    view = pivot(table, metric) if as_pivot else summary(table, metric)
    return (f"mean over {seeds} seeds (--pivot shows the 95% intervals)" if seeds > 1
            else None), view


def plot_curves(table: pd.DataFrame, out_dir: Location | Path | str,
                metric: str = "train_loss") -> Location | None:
    """The paper's Figure 3: a per-step curve (train loss) of every generation, a panel
    per strategy, one line per generation, darker for later generations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table[(table["metric"] == metric) & table["step"].notna()]
    if rows.empty:
        return None
    strategies = list(dict.fromkeys(rows["strategy"]))
    generations = sorted(rows["generation"].unique())
    fig, panels = plt.subplots(1, len(strategies), figsize=(4.2 * len(strategies), 3.6),
                               sharey=True, squeeze=False)
    cmap = plt.get_cmap("viridis")
    for panel, strategy in zip(panels[0], strategies):
        for g in generations:
            curve = rows[(rows["strategy"] == strategy) & (rows["generation"] == g)]
            curve = curve.groupby("step")["value"].mean()
            panel.plot(curve.index, curve.values, color=cmap(0.9 * (g - 1) / max(1, len(generations) - 1)),
                       label=f"generation {g}")
        panel.set_title(strategy)
        panel.set_xlabel("step")
        panel.set_yscale("log")
    panels[0][0].set_ylabel(metric)
    panels[0][-1].legend(fontsize=7, frameon=False)
    fig.suptitle(f"{table['study'].iloc[0]}: {metric} by step, every generation")
    fig.tight_layout()
    path = Location.of(out_dir) / f"{metric}_curves.png"
    _save_png(fig, path, dpi=110)
    return path


def _save_png(fig, path: Location, dpi: int) -> None:
    import matplotlib.pyplot as plt

    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight"))
    plt.close(fig)


def constant(table: pd.DataFrame, metric: str) -> bool:
    """Whether no chain's generations change the metric (it is one value per chain)."""
    rows = table[(table["metric"] == metric) & table["step"].isna()]
    if rows["generation"].nunique() < 2:
        return False
    return bool((rows.groupby("trial")["value"].nunique() == 1).all())


def plot(table: pd.DataFrame, out_dir: Location | Path | str,
         metrics: list[str] | None = None) -> list[Location]:
    """One PNG per metric: metric against generation, a panel per strategy, a line per
    grid-axis value; the family's closed form, where it has one, dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    for metric in metrics or []:
        check_metric(table, metric)
    family = get_family(table["family"].iloc[0])
    # A metric that no chain's generations change (the grammar's own entropy rate,
    # `truth_loss`) is a reference, not a result: drawn as a line under the metric it is
    # the reference of (Presentation.reference_lines), not as a panel of flat lines.
    metrics = metrics or [m for m in family.metrics if m in set(table["metric"])
                          and not m.endswith("_stderr") and not constant(table, m)]
    axes_cols = axis_columns(table)
    strategies = list(dict.fromkeys(table["strategy"]))
    out_dir = Location.of(out_dir)
    written = []
    for metric in metrics:
        fig, panels = plt.subplots(1, len(strategies), figsize=(4.2 * len(strategies), 3.6),
                                   sharey=True, squeeze=False)
        values = table[(table["metric"] == metric) & table["step"].isna()]["value"]
        log_scale = bool((values > 0).all() and values.max() / values.min() > 100)
        for panel, strategy in zip(panels[0], strategies):
            rows = table[table["strategy"] == strategy]
            groups = rows.groupby(axes_cols, sort=False) if axes_cols else [((), rows)]
            for i, (key, group) in enumerate(groups):
                key = key if isinstance(key, tuple) else (key,)
                label = ", ".join(f"{c}={v}" for c, v in zip(axes_cols, key)) or strategy
                color = f"C{i % 10}"
                by_generation = group[(group["metric"] == metric) & group["step"].isna()] \
                    .groupby("generation")["value"]
                mean = by_generation.mean()
                panel.plot(mean.index, mean.values, marker="o", ms=3, color=color, label=label)
                if seed_count(group) > 1:  # the band: the 95% interval over seeds
                    hw = by_generation.agg(half_width)
                    panel.fill_between(mean.index, mean - hw, mean + hw, color=color,
                                       alpha=0.2, lw=0)
                if metric == family.theory_for:
                    th = group[group["metric"] == "theory"].groupby("generation")["value"].mean()
                    if not th.empty:
                        panel.plot(th.index, th.values, ls="--", color=color, lw=1)
            reference = family.presentation.reference_lines.get(metric)
            if reference in set(rows["metric"]):
                level = rows[rows["metric"] == reference]["value"].mean()
                panel.axhline(level, ls=":", color="grey", lw=1)
                panel.annotate(reference, (0, level), xycoords=("axes fraction", "data"),
                               xytext=(3, 3), textcoords="offset points", fontsize=7,
                               color="grey")
            panel.set_title(strategy)
            panel.set_xlabel("generation")
            panel.xaxis.set_major_locator(MaxNLocator(integer=True))  # generations: 1, 2, ...
            if log_scale:
                panel.set_yscale("log")
        panels[0][0].set_ylabel(metric)
        handles, labels = panels[0][0].get_legend_handles_labels()
        if len(labels) > 1:
            fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5),
                       fontsize=7, frameon=False)
        title = f"{table['study'].iloc[0]}: {metric}"
        if metric == family.theory_for:
            title += "  (dashed: closed form)"
        if seed_count(table) > 1:
            title += f"\nmean of {seed_count(table)} seeds; band: 95% t-interval"
        fig.suptitle(title)
        fig.tight_layout()
        path = out_dir / f"{metric}.png"
        _save_png(fig, path, dpi=110)
        written.append(path)
    curves = plot_curves(table, out_dir)
    return written + ([curves] if curves else [])


def plot_samples(study_dir: Location | Path | str, out_dir: Location | Path | str) -> list[Location]:
    """For image families: one PNG per chain, a row of samples per generation under a
    row of real training images (the seed paper's Fig. 6: under replace the rows drift
    to one mode, under accumulate they keep their variety). Reads the few images each
    chain keeps in previews/, not the corpora."""
    import io

    import numpy as np

    run, out_dir = RunLayout.of(study_dir), Location.of(out_dir)
    written = []
    for chain in run.chains():
        files = [f for f in chain.previews.children()
                 if f.name.startswith("synthetic-") and f.name.endswith(".npy")]
        if not files:
            continue
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [("real", chain.preview("real"))] + [
            (f"gen {int(f.name[:-len('.npy')].split('-')[1])}", f) for f in files]
        rows = [(label, np.load(io.BytesIO(f.read_bytes()))) for label, f in rows if f.exists()]
        k = max(len(images) for _, images in rows)
        fig, cells = plt.subplots(len(rows), k, figsize=(0.7 * k, 0.75 * len(rows)),
                                  squeeze=False)
        for r, (label, images) in enumerate(rows):
            for c in range(k):
                cell = cells[r][c]
                cell.set_xticks([])
                cell.set_yticks([])
                if c < len(images):
                    cell.imshow(images[c], cmap="gray" if images.ndim == 3 else None,
                                vmin=0, vmax=1)
            cells[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
        fig.suptitle(f"{run.out.name}: {chain.root.name}", fontsize=9)
        path = out_dir / f"samples_{chain.root.name}.png"
        _save_png(fig, path, dpi=100)
        written.append(path)
    return written


def plot_histograms(study_dir: Location | Path | str,
                    out_dir: Location | Path | str) -> list[Location]:
    """For families that record histograms against generation 1 (the LM's
    `score_under_first`): one PNG per chain and histogram, the share of samples per bin
    for every generation, darker for later ones, over the real data's (dashed); a
    dotted line at the real data's 99th percentile (Shumailov et al. 2024, Fig. 1b)."""
    import numpy as np

    run, out_dir = RunLayout.of(study_dir), Location.of(out_dir)
    written = []
    for chain in run.chains():
        by_name: dict[str, dict[int, dict]] = {}
        g = 1
        while chain.metrics(g).exists():
            record = read_record(chain.metrics(g))
            for name, hist in record.get("histograms", {}).items():
                by_name.setdefault(name, {})[g] = hist
            g += 1
        for name, generations in by_name.items():
            if name.endswith("_real"):
                continue
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(5.5, 3.6))
            cmap = plt.get_cmap("viridis")
            last = max(generations)
            for gen, hist in sorted(generations.items()):
                edges, counts = np.asarray(hist["edges"]), np.asarray(hist["counts"], float)
                ax.stairs(counts / max(1.0, counts.sum()), edges,
                          color=cmap(0.9 * (gen - 1) / max(1, last - 1)),
                          label=f"generation {gen}")
            real = by_name.get(f"{name}_real", {}).get(1)
            if real is not None:
                counts = np.asarray(real["counts"], float)
                ax.stairs(counts / max(1.0, counts.sum()), np.asarray(real["edges"]),
                          color="black", ls="--", label="real test stories")
                ax.axvline(real["real_p99"], color="black", ls=":", lw=1)
            ax.set_xscale("log")
            ax.set_xlabel(name.replace("_", " ").replace("first model", "generation 1 model's"))
            ax.set_ylabel("share of stories")
            ax.legend(fontsize=7, frameon=False)
            ax.set_title(f"{run.out.name}: {chain.root.name}", fontsize=9)
            fig.tight_layout()
            path = out_dir / f"{name}_{chain.root.name}.png"
            _save_png(fig, path, dpi=110)
            written.append(path)
    return written
