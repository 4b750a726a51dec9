"""The tidy table, its pivot and plots, through Ray Tune and the CLI."""
import numpy as np
import pandas as pd
import pytest

import engine
from conftest import collapse, write_study
from engine import results

STUDY = """\
name: tidy
family: {{name: gaussian, d: [1, 2], n: 50, trials: 200}}
strategies: [replace, accumulate]
generations: 3
seeds: [0, 1]
out: {out}
"""


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tidy")
    study = write_study(tmp / "tidy.yaml", STUDY.format(out=tmp / "out"))
    r = collapse("run", study)
    assert r.returncode == 0, r.stderr
    return tmp / "out", r


def test_run_prints_progress_and_the_pivot(finished):
    out, r = finished
    assert "[tidy] 24/24 generations" in r.stderr
    # every line but the last estimates the time left from the run's pace
    import re

    progress = [line for line in r.stderr.splitlines() if " generations (" in line]
    assert len(progress) == 24
    assert all(re.search(r"\(\d+s, ~\d+(\.\d)? (s|min|h) left\)", line) for line in progress[:-1])
    assert "results.parquet (" in r.stdout and "accumulate" in r.stdout


def test_table_is_tidy_with_one_column_per_axis(finished):
    out, _ = finished
    table = engine.load_results(out)
    assert list(table.columns) == results.FIXED_COLUMNS + ["d"]
    assert set(table.metric) == {"variance_ratio", "mean_error", "fitted_variance",
                                 "w2_squared", "log_det_cov", "trace_vs_first",
                                 "log_det_vs_first", "theory"}
    # every (strategy, d, seed, generation, metric) exactly once
    key = ["strategy", "d", "seed", "generation", "metric"]
    assert not table.duplicated(key).any()
    assert len(table) == 2 * 2 * 2 * 3 * 8  # strategies × d × seeds × generations × metrics
    assert table.temperature.isna().all() and set(table.model) == {"gaussian-1d", "gaussian-2d"}
    csv = pd.read_csv(out / "results.csv")
    assert np.allclose(csv["value"], table["value"])


def test_collapse_table_pivots_strategy_and_axes_by_generation(finished):
    out, _ = finished
    r = collapse("table", out, "--metric", "w2_squared")
    assert r.returncode == 0, r.stderr
    header = r.stdout.splitlines()[1]  # after the line saying what the ± is
    assert header.split()[-3:] == ["1", "2", "3"]
    assert sum(line.startswith(("replace", "accumulate")) for line in r.stdout.splitlines()) == 2
    r = collapse("table", out, "--metric", "nope")
    assert r.returncode == 2 and "no metric 'nope'" in r.stderr


def test_collapse_plot_writes_a_png_per_metric(finished):
    out, _ = finished
    r = collapse("plot", out)
    assert r.returncode == 0, r.stderr
    pngs = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert pngs == ["fitted_variance.png", "mean_error.png", "variance_ratio.png", "w2_squared.png"]
    assert all((out / "plots" / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)


def test_table_of_a_directory_without_results(tmp_path):
    r = collapse("table", tmp_path)
    assert r.returncode == 2 and "no results table" in r.stderr


def test_seeds_give_intervals_and_a_paired_difference(finished):
    """Two seeds: each cell is mean ± the half-width of the 95% t-interval (t(0.975, 1) =
    12.706); --diff pairs the strategies seed by seed."""
    out, _ = finished
    table = engine.load_results(out)
    cell = table[(table.metric == "w2_squared") & (table.strategy == "replace")
                 & (table.d == 1) & (table.generation == 3)].sort_values("seed").value
    assert len(cell) == 2
    hw = 12.7062047 * cell.std(ddof=1) / np.sqrt(2)
    view = results.pivot_with_intervals(table, "w2_squared")
    assert view.loc[("replace", "gaussian-1d", 1), 3] == f"{cell.mean():.4g} ± {hw:.2g}"
    r = collapse("table", out, "--metric", "w2_squared")
    assert r.stdout.splitlines()[0] == \
        "mean ± half-width of the 95% Student-t interval over 2 seeds"
    assert f"{cell.mean():.4g} ± {hw:.2g}" in r.stdout

    other = table[(table.metric == "w2_squared") & (table.strategy == "accumulate")
                  & (table.d == 1) & (table.generation == 3)].sort_values("seed").value
    d = cell.to_numpy() - other.to_numpy()
    expected = f"{d.mean():.4g} ± {12.7062047 * d.std(ddof=1) / np.sqrt(2):.2g}"
    diff = results.paired_difference(table, "replace", "accumulate", "w2_squared")
    assert diff.loc[("replace - accumulate", "gaussian-1d", 1), 3] == expected
    # generation 1 is the same model for both (common random numbers): no difference
    assert diff.loc[("replace - accumulate", "gaussian-1d", 1), 1] == "0 ± 0"
    r = collapse("table", out, "--metric", "w2_squared", "--diff", "replace", "accumulate")
    assert r.returncode == 0 and expected in r.stdout, r.stderr
    r = collapse("table", out, "--diff", "replace", "acumulate")
    assert r.returncode == 2 and r.stderr.strip() == \
        "no strategy 'acumulate' in the table (it has: replace, accumulate)"


def test_report_is_one_page_a_browser_renders_with_every_view(finished, tmp_path):
    """`collapse report`: one HTML file with the tables, the plots embedded, the run's
    facts and the study; opened in headless Chromium, its DOM holds them and its
    screenshot shows the plots (matplotlib's first line colour is drawn)."""
    import base64
    import io
    import json
    import re

    import ray
    from PIL import Image

    from conftest import render_page

    out, _ = finished
    r = collapse("report", out)
    assert r.returncode == 0, r.stderr
    page = out / "report.html"
    assert r.stdout.strip() == str(page)
    dom, shot = render_page(page, tmp_path)
    headings = re.findall(r'<h2 id="[^"]+">([^<]+)</h2>', dom)
    assert headings == ["Results", "Plots", "Every metric", "Samples", "Run", "Study"]
    metrics = re.findall(r"<h3>([^<]+)</h3>", dom.split('id="every-metric"')[1]
                         .split('id="samples"')[0])
    assert metrics == ["variance_ratio", "mean_error", "fitted_variance", "w2_squared",
                       "log_det_cov", "log_det_vs_first", "theory", "trace_vs_first"]
    # the collapse profile of the headline metric, per strategy and d
    assert "<h3>Collapse profile</h3>" in dom and "lowest AICc" in dom
    # the cell `collapse table` prints, with its interval over the two seeds
    table = engine.load_results(out)
    cell = results.pivot_with_intervals(table, "w2_squared").loc[("replace", "gaussian-1d", 1), 3]
    assert "±" in cell and f"<td>{cell}</td>" in dom
    # the plots travel inside the page, as PNGs matplotlib drew
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)"', dom)
    assert sorted(name for name, _ in images) == ["fitted_variance.png", "mean_error.png",
                                                  "variance_ratio.png", "w2_squared.png"]
    for _, data in images:
        assert Image.open(io.BytesIO(base64.b64decode(data))).size[0] > 400
    # the run's facts: this run, finished, on this Ray
    runs = json.loads((out / "runs.json").read_text())
    assert len(runs) == 1 and runs[0]["seconds"] > 0 and runs[0]["nodes"][0]["cpus"] >= 1
    assert f"ray {ray.__version__}" in dom and "finished" in dom
    assert "seconds per phase" in dom and "evaluate" in dom
    assert "name: tidy" in dom and "strategies:" in dom  # the resolved study
    # the browser drew the plots: pixels of matplotlib's C0 blue (31, 119, 180)
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)
    blue = np.abs(pixels - [31, 119, 180]).sum(axis=1) < 30
    assert blue.sum() > 500, blue.sum()


def test_report_of_a_directory_without_results(tmp_path):
    r = collapse("report", tmp_path)
    assert r.returncode == 2 and "no results table" in r.stderr


def test_collapse_table_profile_needs_enough_generations(finished):
    out, _ = finished
    r = collapse("table", out, "--metric", "w2_squared", "--profile")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("collapse profile of w2_squared: the growth over generations")
    # three generations: too few to tell a line from a curve, and it says so
    assert r.stdout.count("too few to tell the forms apart (4 needed)") == 4  # strategy × d


def test_plots_count_generations_in_whole_numbers_and_draw_a_constant_as_a_reference(
        tmp_path, monkeypatch):
    """A generation axis has integer ticks (not 1.0, 1.5, 2.0); a metric no generation
    changes (the grammar's entropy rate) is a reference line under test_loss, not a
    panel of flat lines."""
    import pandas as pd

    from engine import results

    rows = []
    for strategy in ("replace", "accumulate"):
        for g in (1, 2, 3):
            for metric, value in (("test_loss", 1.0 + g * (strategy == "replace")),
                                  ("truth_loss", 0.27), ("kl_to_truth", 0.7 + g)):
                rows.append({"study": "s", "trial": f"{strategy}__seed=0", "family": "lm",
                             "model": "tiny", "strategy": strategy, "temperature": 1.0,
                             "seed": 0, "generation": g, "metric": metric, "value": value,
                             "step": pd.NA})
    table = pd.DataFrame(rows)
    table["step"] = table["step"].astype("Int64")
    figures = {}

    def keep(fig, path, dpi):
        figures[path.name] = fig

    monkeypatch.setattr(results, "_save_png", keep)
    written = [p.name for p in results.plot(table, tmp_path)]
    assert "truth_loss.png" not in written and "test_loss.png" in written
    panel = figures["test_loss.png"].axes[0]
    ticks = [t for t in panel.get_xticks() if 1 <= t <= 3]
    assert ticks == [1, 2, 3]
    assert any(line.get_linestyle() == ":" and set(line.get_ydata()) == {0.27}
               for line in panel.get_lines())  # the reference
