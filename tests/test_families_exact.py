"""The exact families against their closed forms, through the real chain and store."""
import numpy as np
import pytest

from engine import results
from engine.chain import run_chain
from engine.spec import load_study

from conftest import write_study


def run_in_process(tmp_path, family: str, strategies, generations: int, sample_last=True):
    tmp_path.mkdir(parents=True, exist_ok=True)
    """Every chain of a small study through run_chain (the code Tune runs), no Ray; by
    default every generation samples, the last too (its diversity metrics)."""
    f = write_study(tmp_path / "s.yaml",
                    f"name: exact\nfamily: {family}\nstrategies: {strategies}\n"
                    f"generations: {generations}\nseeds: [0]\nout: {tmp_path / 'out'}\n"
                    f"sample_last: {str(sample_last).lower()}\n")
    study = load_study(f)
    for trial in study.trials():
        run_chain(trial, trial.generations, study.out)
    return results.collect(study)


@pytest.mark.parametrize("d,T,sigma2", [(5, 20, 1.0), (10, 40, 0.1), (3, 15, 10.0)])
def test_linear_test_error_within_5_percent_of_closed_form(tmp_path, d, T, sigma2):
    table = run_in_process(
        tmp_path, f"{{name: linear, d: {d}, T: {T}, sigma2: {sigma2}, trials: 3000}}",
        "[replace, accumulate, replace_multiple]", 8)
    wide = table.pivot_table(index=["strategy", "generation"], columns="metric", values="value")
    ratio = wide["test_error"] / wide["theory"]
    assert len(ratio) == 3 * 8
    assert ((ratio - 1).abs() < 0.05).all(), ratio.to_string()
    # and the phenomenon itself: replace grows linearly, accumulate stays below π²/6
    base = sigma2 * d / (T - d - 1)
    assert wide.loc[("replace", 8), "test_error"] > 6 * base
    assert wide.loc[("accumulate", 8), "test_error"] < np.pi**2 / 6 * base * 1.05


def test_gaussian_variance_ratio_follows_its_pathways(tmp_path):
    table = run_in_process(tmp_path, "{name: gaussian, d: 2, n: 100, trials: 4000}",
                           "[replace, accumulate, replace_multiple, subsample]", 10)
    wide = table.pivot_table(index=["strategy", "generation"], columns="metric", values="value")
    for strategy in ("replace", "accumulate", "replace_multiple"):
        ratio = wide.loc[strategy, "variance_ratio"] / wide.loc[strategy, "theory"]
        assert ((ratio - 1).abs() < 0.06).all(), (strategy, ratio.to_string())
    # replace collapses the fitted variance; accumulate keeps it
    assert wide.loc[("replace", 10), "fitted_variance"] < 0.95
    assert abs(wide.loc[("accumulate", 10), "fitted_variance"] - 1) < 0.03
    assert wide.loc[("replace", 10), "w2_squared"] > 3 * wide.loc[("accumulate", 10), "w2_squared"]
    # the fitted covariance's volume shrinks under replace (log det below the truth's
    # 0, and below generation 1's), not under accumulate
    assert wide.loc[("replace", 10), "log_det_cov"] < wide.loc[("replace", 1), "log_det_cov"] - 0.1
    assert abs(wide.loc[("accumulate", 10), "log_det_cov"]) < 0.1
    # against each chain's own generation 1: exactly 1 and 0 there; replace shrinks
    # both trace and determinant, accumulate keeps them near generation 1's
    for strategy in ("replace", "accumulate"):
        assert wide.loc[(strategy, 1), "trace_vs_first"] == 1.0
        assert wide.loc[(strategy, 1), "log_det_vs_first"] == 0.0
    assert wide.loc[("replace", 10), "trace_vs_first"] < 0.95
    assert wide.loc[("replace", 10), "log_det_vs_first"] < -0.1
    assert abs(wide.loc[("accumulate", 10), "trace_vs_first"] - 1) < 0.03
    assert wide.loc[("replace", 10), "log_det_vs_first"] < \
        wide.loc[("accumulate", 10), "log_det_vs_first"] - 0.1
    # sub sits between accumulate and replace
    sub = wide.loc[("subsample", 10), "variance_ratio"]
    assert wide.loc[("accumulate", 10), "variance_ratio"] < sub < wide.loc[("replace", 10), "variance_ratio"]


def test_every_strategy_runs_through_the_chain(tmp_path):
    table = run_in_process(
        tmp_path, "{name: linear, d: 3, T: 12, sigma2: 1.0, trials: 50}",
        "[replace, accumulate, replace_multiple, subsample, subsample_with_replacement, "
        "accumulate_fresh_real]", 3)
    counts = table[table.metric == "test_error"].groupby("strategy")["generation"].nunique()
    assert (counts == 3).all() and len(counts) == 6
    # generation 1 trains on the same real data under every strategy
    first = table[(table.metric == "test_error") & (table.generation == 1)]["value"]
    assert first.nunique() == 1
    # fresh real data keeps helping: below accumulate at generation 3
    g3 = table[(table.metric == "test_error") & (table.generation == 3)].set_index("strategy")["value"]
    assert g3["accumulate_fresh_real"] < g3["accumulate"]


def test_workflows_land_where_the_literature_puts_them(tmp_path):
    """Real data mixed into each generation (Bertrand et al.), a decaying real share,
    fresh real data each generation (Alemohammad et al.) and a constant synthetic share
    in growing real data (Dohmatob et al.), on the exact linear family."""
    table = run_in_process(
        tmp_path, "{name: linear, d: 5, T: 40, sigma2: 1.0, trials: 2000}",
        "[replace, accumulate, {name: real_half, real: {fraction: 0.5}}, "
        "{name: real_decay, real: {fraction: 0.5, schedule: exponential, decay: 0.5}}, "
        "{name: fresh_loop, real: {fraction: 0.5}, real_data: fresh}, "
        "{name: growing, real: {fraction: 1.0}, real_data: growing, synthetic: {fraction: 0.2}}]",
        7, sample_last=False)
    error = table[table.metric == "test_error"].pivot_table(
        index="generation", columns="strategy", values="value")
    first, last = error.loc[1], error.loc[7]
    assert first.nunique() == 1  # the same generation 1 everywhere
    # a decaying real share lands between replace and accumulate
    assert last["accumulate"] < last["real_decay"] < last["replace"]
    # a constant real share keeps the error bounded: it barely moves over the last
    # generations while replace keeps climbing by about generation 1's error each
    assert error.loc[7, "real_half"] - error.loc[5, "real_half"] < 0.25 * first["replace"]
    assert error.loc[7, "replace"] - error.loc[5, "replace"] > 1.5 * first["replace"]
    assert last["real_half"] < 0.5 * last["replace"]
    # fresh real data each generation is at least as good as reusing the same rows
    assert last["fresh_loop"] < last["real_half"]
    # growing real data with a fixed synthetic share keeps improving on generation 1
    assert last["growing"] < 0.3 * first["growing"]
    assert "theory" not in set(table[table.strategy == "real_half"].metric)


def test_logistic_variance_ratio_accumulate_near_sum_inverse_squares(tmp_path):
    # Dey & Donoho's universality: the logistic MLE's error ratio to generation 1
    # follows linear regression's factors, Σ 1/i² under accumulate, ~g under replace.
    table = run_in_process(tmp_path, "{name: logistic, d: 4, T: 600, trials: 1500}",
                           "[replace, accumulate]", 10)
    wide = table.pivot_table(index=["strategy", "generation"], columns="metric", values="value")
    accumulate = wide.loc[("accumulate", 10), "variance_ratio"]
    assert abs(accumulate / np.sum(1 / np.arange(1, 11) ** 2) - 1) < 0.10, accumulate
    replace = wide.loc["replace", "variance_ratio"]
    assert replace[1] == 1.0 and wide.loc[("accumulate", 1), "variance_ratio"] == 1.0
    # replace grows roughly linearly: each generation adds about generation 1's error
    slope = np.polyfit(replace.index.to_numpy(float), replace.to_numpy(), 1)[0]
    assert 0.7 < slope < 1.4, replace.to_string()
    assert (np.diff(replace.to_numpy()) > 0).sum() >= 8


def _weighted_workflows(weights, T: int) -> str:
    """Fresh real data each generation beside as many samples of the previous model,
    the real rows weighing `w` of the loss and the synthetic ones 1 − w."""
    return "[" + ", ".join(
        f"{{name: w{round(w * 1000)}, real: {{fraction: 1.0}}, real_data: fresh, "
        f"synthetic: {{rows: {T}}}, weights: {{real: {w}, synthetic: {1 - w:.6f}}}}}"
        for w in weights) + "]"


def test_weighted_real_and_synthetic_data_has_the_golden_ratio_optimum(tmp_path):
    """He, Xu & Cheng 2025, the Gaussian mean: with n fresh real and n synthetic rows
    each generation, θ_g = w·x̄_real + (1 − w)·x̄_synthetic, so the error's stationary
    value is (σ²/n)·f(w), f(w) = (2w² − 2w + 1) / (w(2 − w)), least at w = 1/φ ≈ 0.618
    (f = 1/φ there: better than real data alone, f(1) = 1)."""
    weights = [0.3, 0.5, 0.618, 0.75, 0.95]
    table = run_in_process(tmp_path, "{name: gaussian, d: 1, n: 100, trials: 10000}",
                           _weighted_workflows(weights, 100), 8, sample_last=False)
    wide = table.pivot_table(index=["strategy", "generation"], columns="metric", values="value")
    # generations 4-8: the recursion (1 − w)² per generation has settled
    measured = np.array([wide.loc[(f"w{round(w * 1000)}", slice(4, 8)), "variance_ratio"].mean()
                         for w in weights])
    w = np.array(weights)
    closed_form = (2 * w ** 2 - 2 * w + 1) / (w * (2 - w))
    # a generation's mean over 10,000 trials has a relative standard error of
    # √(2/10,000) = 1.4% (d = 1: the squared error is σ²/n times a χ²₁); 5 generations
    # averaged: about 0.8%. Each point within 3 of those.
    assert np.abs(measured / closed_form - 1).max() < 0.025, (measured, closed_form)
    # an interior minimum, below real data alone, at the golden ratio
    assert measured[0] > measured[2] + 0.3 and measured[-1] > measured[2] + 0.2
    assert measured[2] < 0.66
    a, b, _ = np.polyfit(w[1:4], measured[1:4], 2)
    # The curve is flat at its floor (f(0.5) − f(0.618) = 0.049), so a 0.8% error in a
    # point moves the three-point vertex by about 0.015: 0.03 is two of those.
    assert abs(-b / (2 * a) - (np.sqrt(5) - 1) / 2) < 0.03, -b / (2 * a)


def test_weighted_least_squares_with_fresh_real_data_has_an_interior_optimum(tmp_path):
    """The linear family: fresh real labels each generation beside the previous model's;
    weighting the synthetic rows a little lowers the error below real data alone
    (w = 1), and weighting them much raises it above: an interior minimum."""
    weights = [0.2, 0.5, 1.0]
    table = run_in_process(tmp_path, "{name: linear, d: 5, T: 20, trials: 3000}",
                           _weighted_workflows(weights, 20), 8, sample_last=False)
    wide = table.pivot_table(index=["strategy", "generation"], columns="metric", values="value")
    last = {w: wide.loc[(f"w{round(w * 1000)}", slice(5, 8)), "test_error"].mean()
            for w in weights}
    stderr = wide.loc[("w500", 8), "test_error_stderr"]
    assert last[0.5] < last[1.0] - 10 * stderr and last[0.5] < last[0.2] - 10 * stderr, last
    # w = 1 puts no weight on the synthetic rows: each generation is OLS on T real rows,
    # the closed form's generation-1 error σ²d/(T − d − 1)
    assert abs(last[1.0] / (5 / (20 - 5 - 1)) - 1) < 0.05, last


def test_kde_chains_replace_degrades_accumulate_stays_bounded_subsample_degrades_slowly(
        tmp_path):
    """Kazdan et al. 2024 ("Collapse or Thrive?"), their KDE setting: a Gaussian KDE fit
    each generation to the mix and sampled for the next, on a 4-component mixture in
    2-D with a known density; excess_nll estimates KL(truth ‖ fit) on held-out draws."""
    table = run_in_process(tmp_path, "{name: kde, n: 100, trials: 50}",
                           "[replace, accumulate, subsample]", 10, sample_last=False)
    wide = table.pivot_table(index=["strategy", "generation"], columns="metric", values="value")
    excess = wide["excess_nll"].unstack(0)  # generation x strategy
    first = excess.loc[1]
    assert (first == first.iloc[0]).all() and 0.05 < first.iloc[0] < 0.5  # shared, real data
    # replace: worse every generation, without bound (kernel noise added each time)
    assert (excess["replace"].diff().dropna() > 0).all()
    assert excess.loc[10, "replace"] > 4 * excess.loc[1, "replace"]
    # accumulate: bounded, its steps shrinking
    acc = excess["accumulate"]
    assert acc.loc[10] < 2 * acc.loc[1]
    assert acc.loc[10] - acc.loc[7] < 0.5 * (acc.loc[4] - acc.loc[1])
    # subsample (a fixed budget from the accumulated pool): between them, still degrading
    sub = excess["subsample"]
    assert acc.loc[10] + 0.08 < sub.loc[10] < excess.loc[10, "replace"] - 0.5
    assert sub.loc[10] - sub.loc[5] > 2 * (acc.loc[10] - acc.loc[5])
    # the truth's own NLL is the floor every fit stays above
    assert (wide["test_nll"] > wide["truth_nll"]).all()
    assert wide.loc[("replace", 10), "spread"] > 2 > wide.loc[("accumulate", 10), "spread"]


def test_kde_chains_on_the_digits_principal_components(tmp_path):
    """Kazdan et al.'s KDE setting on real data: the digit scans on their first 5
    principal components, each trial its own real chunks, 400 scans held out. No known
    density, so the held-out NLL itself; the three directions as on the mixture.
    Measured 2026-12-03 (generation 1 -> 10): replace 4.44 -> 9.37, accumulate -> 5.21
    (its steps shrinking), subsample -> 5.68."""
    table = run_in_process(tmp_path, "{name: kde, data: digits, d: 5, n: 200, "
                                     "test_points: 400, trials: 20}",
                           "[replace, accumulate, subsample]", 10, sample_last=False)
    assert set(table.metric) == {"test_nll", "spread"}  # no truth to compare with
    nll = table.pivot_table(index=["strategy", "generation"], columns="metric",
                            values="value")["test_nll"].unstack(0)
    assert nll.loc[1].nunique() == 1 and 3 < nll.loc[1].iloc[0] < 6  # one shared real fit
    assert (nll["replace"].diff().dropna() > 0).all()
    assert nll.loc[10, "replace"] > nll.loc[1, "replace"] + 3
    acc, sub = nll["accumulate"], nll["subsample"]
    assert acc.loc[10] - acc.loc[7] < 0.5 * (acc.loc[4] - acc.loc[1])
    assert acc.loc[10] + 0.15 < sub.loc[10] < nll.loc[10, "replace"] - 2
    assert sub.loc[10] > sub.loc[4] + 0.2  # still degrading, slowly


def test_kde_digits_input_is_checked_before_anything_runs():
    from engine.families import get_family
    from engine.families.base import ParamError

    for params, field in (({"data": "faces"}, "data"), ({"data": "digits", "d": 65}, "d"),
                          ({"data": "digits", "test_points": 1797}, "test_points")):
        with pytest.raises(ParamError) as e:
            get_family("kde").from_params(params).validate()
        assert e.value.field == field
    kde = get_family("kde").from_params({"data": "digits", "d": 3, "n": 700, "trials": 2})
    with pytest.raises(ParamError, match=r"set n to at most 648") as e:
        kde.real_data(seed=0, chunks=2)  # 1,297 scans beside the 500 held out
    real = kde.real_data(seed=0, chunks=1)
    x = kde._points(real.train_chunks[0])
    assert x.shape == (2, 700, 3) and not np.array_equal(x[0], x[1])  # each trial its own
    held_out = {tuple(r) for r in real.test[0].round(9)}
    assert not held_out & {tuple(r) for r in x.reshape(-1, 3).round(9)}  # disjoint


def test_kde_density_is_scipys_gaussian_kde_and_bandwidths_follow_their_rules():
    from scipy.stats import gaussian_kde

    from engine.families import get_family
    from engine.families.gaussian import points_table

    def family_for_params(name, params):
        return get_family(name).from_params(params)

    rng = np.random.default_rng(3)
    x = rng.standard_normal((60, 2, 2)) * [1.0, 3.0]  # (rows, trials, d)
    test = rng.standard_normal((2, 7, 2))
    for bandwidth in ("scott", "silverman", 0.4):
        kde = family_for_params("kde", {"d": 2, "trials": 2, "bandwidth": bandwidth})
        model = kde.fit(None, points_table(x), seed=0)
        ours = kde.log_density(model, test)
        for t in range(2):
            method = bandwidth if isinstance(bandwidth, str) else \
                0.4 / np.sqrt(np.cov(x[:, t].T)[0, 0])  # scipy scales by the data's std
            if isinstance(bandwidth, str):
                theirs = gaussian_kde(x[:, t].T, bw_method=method).logpdf(test[t].T)
                assert ours[t] == pytest.approx(theirs, rel=1e-9)
            else:
                assert np.allclose(model.cov[t], 0.16 * np.eye(2))
    # samples of a KDE: a row plus kernel noise, so their spread is the rows' plus h²·d
    kde = family_for_params("kde", {"d": 2, "trials": 2, "bandwidth": 0.4})
    model = kde.fit(None, points_table(np.zeros((5, 2, 2))), seed=0)
    drawn = kde._points(kde.sample(None, model, 20000, seed=1))
    assert np.var(drawn, axis=1).mean() == pytest.approx(0.16, rel=0.03)
