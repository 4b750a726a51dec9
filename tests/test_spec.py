"""Study files: loading, --set overrides, grid expansion and one-line errors (exit 2)."""
import pytest

from conftest import REPO, collapse, write_study
from engine.spec import SpecError, load_study

GOOD = """\
name: demo
family: {{name: linear, d: [3, 4], T: 20, sigma2: 1, trials: 10}}
strategies: [replace, accumulate]
generations: 2
seeds: [0, 1]
out: {out}
"""


@pytest.fixture
def study_file(tmp_path):
    return write_study(tmp_path / "demo.yaml", GOOD.format(out=tmp_path / "out"))


def test_grid_is_strategies_times_list_axes_times_seeds(study_file):
    study = load_study(study_file)
    trials = study.trials()
    assert len(trials) == 2 * 2 * 2
    assert study.axes == {"d": [3, 4]}
    assert {t.trial_id for t in trials} == {
        f"{s}__d={d}__seed={seed}" for s in ("replace", "accumulate") for d in (3, 4)
        for seed in (0, 1)}
    assert all(t.params["sigma2"] == 1.0 and isinstance(t.params["sigma2"], float) for t in trials)


def test_set_overrides_any_dotted_key(study_file):
    study = load_study(study_file, ["family.d=7", "generations=12",
                                    "strategies=[replace,accumulate]", "family.T=[30,40]"])
    assert study.family_params["d"] == 7 and study.generations == {"replace": 12, "accumulate": 12}
    assert study.strategies == ("replace", "accumulate")
    assert study.axes == {"T": [30, 40]}


def test_default_out_is_results_slash_name(tmp_path):
    f = write_study(tmp_path / "s.yaml", GOOD.format(out="x").replace("out: x\n", ""))
    assert load_study(f).out == "results/demo"


BAD = [
    # (override, expected fragment of the one-line message)
    ("colour=red", "colour (from --set): unknown key (allowed: name, description, family"),
    ("family.dd=3", "family.dd (from --set): unknown parameter of family 'linear' (allowed: d, T"),
    ("family.d=ten", "family.d (from --set): expected an integer, got 'ten'"),
    ("family.d=[3,ten]", "family.d[1] (from --set): expected an integer, got 'ten'"),
    ("family.sigma2=-1", "family.sigma2 (from --set): must be > 0, got -1.0"),
    ("family.T=5", "family.T (from --set): must be >= d + 2 = 6 for ordinary least squares"),
    ("strategies=[replace,acumulate]",
     "strategies[1] (from --set): unknown strategy 'acumulate' (known: replace, accumulate"),
    ("family.name=transformer", "family.name (from --set): unknown family 'transformer' (known: linear"),
    ("generations=0", "generations (from --set): expected an integer >= 1, got 0"),
    ("seeds=3", "seeds (from --set): expected a non-empty list of integers"),
    ("resources.gpus=1", "resources.gpus (from --set): unknown key (allowed: cpus_per_trial"),
    ("family.d=[]", "family.d (from --set): an empty list gives an empty grid"),
    ("strategies=[replace,{name: half, real: {fraction: 1.5}}]",
     "strategies[1].real.fraction (from --set): expected a number in [0, 1], got 1.5"),
    ("strategies=[{name: half, real: {fraction: 0.5, schedule: cosine}}]",
     "strategies[0].real.schedule (from --set): unknown schedule 'cosine' (known: constant, "
     "linear, exponential)"),
    ("strategies=[{name: half, real: {fraction: 0.5, rows: 3}}]",
     "strategies[0].real (from --set): give exactly one of `fraction` and `rows`"),
    ("strategies=[{name: half, real: {fraction: 1.0}, real_data: growing}]",
     "strategies[0].synthetic (from --set): growing real data has no `rest of T`"),
    ("strategies=[{name: replace, real: {rows: 3}}]",
     "strategies[0].name (from --set): 'replace' is a built-in strategy"),
    ("strategies=[{name: half, real: {rows: 3}, fresh: true}]",
     "strategies[0].fresh (from --set): unknown key (allowed: name, real, real_data, synthetic, "
     "weights)"),
    ("strategies=[{name: half, real: {rows: 3}, weights: {real: -1, synthetic: 1}}]",
     "strategies[0].weights.real (from --set): expected a number >= 0, got -1"),
    ("strategies=[{name: half, real: {rows: 3}, weights: {real: 1}}]",
     "strategies[0].weights (from --set): expected {real: w, synthetic: w}"),
]


@pytest.mark.parametrize("override,message", BAD)
def test_bad_input_is_one_line_naming_file_and_field_exit_2_and_nothing_touched(
        tmp_path, study_file, override, message):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier results")
    before = sorted(p.name for p in out.rglob("*"))
    r = collapse("run", study_file, "--set", override)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"{study_file}: ")
    assert message in lines[0]
    assert sorted(p.name for p in out.rglob("*")) == before
    assert (out / "keep.txt").read_text() == "earlier results"


def test_bad_input_creates_no_output_directory(tmp_path, study_file):
    r = collapse("run", study_file, "--set", "family.d=0")
    assert r.returncode == 2 and "family.d (from --set): must be >= 1, got 0" in r.stderr
    assert not (tmp_path / "out").exists()


def test_error_in_the_file_itself_is_not_blamed_on_set(tmp_path):
    f = write_study(tmp_path / "s.yaml", GOOD.format(out=tmp_path / "o").replace("T: 20", "T: 4"))
    with pytest.raises(SpecError) as e:
        load_study(f)
    assert str(e.value).startswith(f"{f}: family.T: must be >= d + 2 = 5")
    assert "at d=3" in str(e.value)


def test_missing_file_and_invalid_yaml(tmp_path):
    r = collapse("run", tmp_path / "nope.yaml")
    assert r.returncode == 2 and "nope.yaml: no such study file" in r.stderr
    bad = write_study(tmp_path / "bad.yaml", "name: [unclosed\n")
    r = collapse("run", bad)
    assert r.returncode == 2 and "bad.yaml: not valid YAML at line" in r.stderr


def test_malformed_set():
    with pytest.raises(SpecError, match="expected KEY=VALUE"):
        load_study("studies/linear_regression.yaml", ["generations"])


# Studies whose data lives on a cluster's shared storage, not in the repository.
ON_A_CLUSTER = {"diffusion_geom.yaml", "vae_celeba.yaml"}


@pytest.mark.parametrize("path", sorted(str(p.relative_to(REPO)) for p in
                                        (REPO / "studies").glob("*.yaml")
                                        if p.name not in ON_A_CLUSTER))
def test_shipped_studies_are_valid(path, monkeypatch):
    monkeypatch.chdir(REPO)
    assert load_study(path).trials()


def test_unreachable_ray_address_is_one_line_exit_2_nothing_written(tmp_path, study_file):
    import socket

    with socket.socket() as s:  # a loopback port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = collapse("run", study_file, "--address", f"127.0.0.1:{port}")
    assert r.returncode == 2
    assert r.stderr.strip() == (f"collapse: cannot reach the Ray cluster: nothing answers at "
                                f"127.0.0.1:{port} (Connection refused); start the cluster "
                                "(ray start --head) or fix --address")
    assert not (tmp_path / "out").exists()


def test_generations_per_strategy(study_file):
    study = load_study(study_file, ["generations={replace: 10, default: 4}"])
    assert {t.strategy: t.generations for t in study.trials()} == {"replace": 10, "accumulate": 4}
    with pytest.raises(SpecError, match=r"generations.reaplce \(from --set\): not one of"):
        load_study(study_file, ["generations={reaplce: 10, default: 4}"])
    with pytest.raises(SpecError, match="no count for accumulate"):
        load_study(study_file, ["generations={replace: 10}"])


def test_a_study_defines_its_own_workflows_beside_the_built_in_strategies(study_file):
    study = load_study(study_file, [
        "strategies=[replace, {name: real_decay, real: {fraction: 0.5, schedule: exponential, "
        "decay: 0.5}}]", "generations={real_decay: 6, default: 3}"])
    assert study.strategies == ("replace", "real_decay")
    by_strategy = {t.strategy: t for t in study.trials()}
    assert by_strategy["replace"].workflow is None
    decay = by_strategy["real_decay"]
    assert decay.generations == 6 and decay.trial_id.startswith("real_decay__")
    assert decay.workflow == {"real": {"fraction": 0.5, "schedule": "exponential", "decay": 0.5}}
    # the definition travels with the trial (Tune ships trials as dicts)
    from engine.spec import Trial
    assert Trial.from_dict(decay.to_dict()) == decay


def test_params_lists_every_family_parameter_with_its_meaning():
    """`collapse params FAMILY` reads the family's Config: every field, its default and
    the comment beside it; an unknown family is one line, exit 2."""
    import dataclasses

    from engine.families import FAMILIES, get_family

    r = collapse("params")
    assert r.returncode == 0 and all(f"\n{n} " in "\n" + r.stdout for n in FAMILIES), r.stdout
    for name in ("lm", "ae"):  # ae: fields of the Config it inherits too
        r = collapse("params", name)
        assert r.returncode == 0, r.stderr
        rows = {line.split()[0]: line for line in r.stdout.splitlines()[3:]}
        fields = dataclasses.fields(get_family(name).Config)
        assert set(rows) == {f.name for f in fields}
        for f in fields:
            assert rows[f.name].split()[1:] and repr(f.default) in rows[f.name], rows[f.name]
    lm = {line.split()[0]: line for line in collapse("params", "lm").stdout.splitlines()[3:]}
    assert lm["temperature"].endswith("sampling temperature (0: greedy)")
    assert "'auto'" in lm["sampler"] and "auto: vllm when installed, else hf" in lm["sampler"]
    r = collapse("params", "lmm")
    assert r.returncode == 2 and r.stderr.strip() == \
        "unknown family 'lmm' (known: " + ", ".join(FAMILIES) + ")"
    # the strategies and a data workflow's keys, `weights` among them
    from engine.strategies import STRATEGIES

    r = collapse("params", "strategies")
    assert r.returncode == 0, r.stderr
    assert all(f"\n{n} " in r.stdout for n in STRATEGIES), r.stdout
    for key in ("real:", "real_data:", "synthetic:", "weights:"):
        assert f"\n{key} " in r.stdout, r.stdout


def test_loss_weights_are_refused_by_a_family_whose_fit_does_not_weight_rows(tmp_path,
                                                                             monkeypatch):
    """Every shipped family weights its rows (the language models each token); a family
    that does not declare it (weighted_fit) is refused at load, the field named."""
    from engine.errors import SpecError
    from engine.families.linear import Linear

    weighted = "[{name: w, real: {fraction: 0.5}, weights: {real: 0.6, synthetic: 0.4}}]"
    f = write_study(tmp_path / "s.yaml", GOOD.format(out=tmp_path / "out"))
    assert load_study(f, [f"strategies={weighted}"]).workflows["w"]["weights"] == {
        "real": 0.6, "synthetic": 0.4}  # the linear family weights its rows
    lm = write_study(tmp_path / "lm.yaml", f"""name: lm
family: {{name: lm, stories: 40, test_stories: 10, vocab_size: 300}}
strategies: {weighted}
generations: 2
seeds: [0]
out: {tmp_path / 'lm-out'}
""")
    assert load_study(lm).workflows["w"]["weights"] == {"real": 0.6, "synthetic": 0.4}
    monkeypatch.setattr(Linear, "weighted_fit", False)
    with pytest.raises(SpecError, match=r"strategies\[0\].weights \(from --set\): the linear "
                       r"family's fit does not weight its rows yet \(families that do: "
                       r"gaussian, logistic, kde, lm, vae, ae, diffusion\)"):
        load_study(f, [f"strategies={weighted}"])
