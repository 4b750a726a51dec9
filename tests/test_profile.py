"""The collapse profile (engine/results/profile.py): the form of a metric's growth over
generations, checked on the seed paper's linear regression, whose growth is known."""
import numpy as np
import pytest

from engine.results import profile as P
from test_families_exact import run_in_process


def test_the_forms_are_told_apart_on_exact_curves():
    g = np.arange(1.0, 11.0)
    named = {}
    for name, y in {"linear": 0.1 * g, "logarithmic": 1 + 0.5 * np.log(g),
                    "bounded": 2 - 1.5 * np.exp(-0.6 * (g - 1))}.items():
        fits = P.fit_forms(g, y)
        named[name] = min(P.FORMS, key=lambda f: fits[f]["aicc"])
        if name == "bounded":
            assert fits["bounded"]["c"] == pytest.approx(2, rel=1e-3)
            assert fits["bounded"]["k"] == pytest.approx(0.6, rel=2e-2)
    assert named == {"linear": "linear", "logarithmic": "logarithmic", "bounded": "bounded"}
    # A straight climb with a slight bend: the bounded form fits it best by AICc (a
    # ceiling of ~13 at a crawl), but it has seen a tenth of that climb: not named.
    bent = 0.14 + 0.14 * (g - 1) - 0.0007 * (g - 1) ** 2
    fits = P.fit_forms(g, bent)
    assert min(P.FORMS, key=lambda f: fits[f]["aicc"]) == "bounded"
    assert P.named_forms(g, fits) == ("linear", "logarithmic")


def test_linear_regression_profile_replace_grows_linearly_accumulate_is_bounded(tmp_path):
    """Ten generations of OLS: under replace the error grows by σ²d/(T−d−1) a
    generation (linear), under accumulate it approaches σ²d/(T−d−1)·π²/6 (bounded), in
    the closed form and in the measured test error alike."""
    d, T, sigma2 = 5, 40, 1.0
    table = run_in_process(tmp_path, f"{{name: linear, d: {d}, T: {T}, sigma2: {sigma2}, "
                                     "trials: 3000}", "[replace, accumulate]", 10)
    base = sigma2 * d / (T - d - 1)
    for metric in ("theory", "test_error"):
        view = P.profile(table, metric, ["strategy"])
        assert view.loc["replace", "profile"] == "linear", view.to_string()
        assert view.loc["accumulate", "profile"] == "bounded", view.to_string()
    exact = P.profile(table, "theory", ["strategy"])
    assert exact.loc["replace", "fit"] == f"{base:.4g} {base:+.4g}·(g−1)"
    assert exact.loc["replace", "R²"] == 1.0
    # the same through `collapse table --profile` on the written table
    from conftest import collapse
    from engine import results

    results.write(table, tmp_path / "out")
    r = collapse("table", tmp_path / "out", "--metric", "theory", "--profile")
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line for line in r.stdout.splitlines()[2:]}
    assert " linear " in rows["replace"] and " bounded " in rows["accumulate"], r.stdout
    fits = P.fit_forms(np.arange(1.0, 11.0),
                       table[(table.metric == "theory") & (table.strategy == "accumulate")]
                       .sort_values("generation").value.to_numpy())
    # ten generations see most of the climb to the limit: within 10% of it
    assert fits["bounded"]["c"] == pytest.approx(base * np.pi ** 2 / 6, rel=0.1)


def test_too_few_generations_say_so():
    import pandas as pd

    table = pd.DataFrame({"metric": "m", "step": pd.NA, "strategy": "replace", "seed": 0,
                          "generation": [1, 2], "value": [1.0, 2.0]})
    view = P.profile(table, "m", ["strategy"])
    assert view.loc["replace", "profile"] == "n/a" and "too few" in view.loc["replace", "fit"]
