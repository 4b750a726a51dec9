"""`collapse run --dry-run`: the plan, on any machine, without running or writing."""
import pytest

from conftest import collapse, write_study
from engine.plan import generation_rows
from engine.spec import load_study


def test_rows_follow_the_strategies(tmp_path):
    f = write_study(tmp_path / "s.yaml", "name: p\nfamily: {name: linear, d: 3, T: 20}\n"
                    "strategies: [replace, accumulate, replace_multiple]\n"
                    "generations: {replace: 6, default: 3}\nseeds: [0]\n")
    rows = generation_rows(load_study(f)).set_index(["strategy", "generation"])
    assert rows.loc[("accumulate", 3), "train_rows"] == 60
    assert rows.loc[("replace", 6), "train_rows"] == 20
    assert rows.loc[("replace_multiple", 3), "train_rows"] == 60
    assert rows.loc[("replace_multiple", 2), "sample_rows"] == 60
    # the last generation samples nothing unless the study asks (sample_last)
    assert rows.loc[("replace_multiple", 3), "sample_rows"] == 0
    assert len(rows) == 6 + 3 + 3
    last = generation_rows(load_study(f, ["sample_last=true"])).set_index(["strategy", "generation"])
    assert last.loc[("replace_multiple", 3), "sample_rows"] == 80


def test_paper_grid_dry_run_works_offline_and_writes_nothing(tmp_path):
    r = collapse("run", "studies/tinystories_paper.yaml", "--dry-run",
                 "--set", f"out={tmp_path / 'out'}", "--gpu", "A100", "--mfu", "0.5")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("tinystories_paper: 24 chains (3 strategies × 8 grid points × 1 seeds)")
    assert "GPU-hours on A100: training" in r.stdout and "at 50% MFU" in r.stdout
    lines = [line.split() for line in r.stdout.splitlines()]
    gens = [line[0] for line in lines if line and line[0].isdigit() and len(line) == 6]
    assert gens == [str(g) for g in range(1, 11)]  # replace runs to generation 10
    # generation 1 of a model is fit once for every strategy and temperature: 4 models,
    # 24 chains, so 4 fits of T stories
    assert lines[[i for i, l in enumerate(lines) if l[:1] == ["1"]][0]][1] == "8.44M"
    assert "shared: generation 1 is fit once per model" in r.stdout
    assert "sampling" in r.stdout and "--decode-tps" in r.stdout
    assert not (tmp_path / "out").exists()
    # the critical path: the longest chain, replace_multiple at the largest model,
    # samples and trains one generation after another
    floor = next(line for line in r.stdout.splitlines() if line.startswith("sampling's floor"))
    sampling = float(r.stdout.split("sampling ")[1].split(",")[0])
    assert 0 < float(floor.split(": ")[1].split(" ")[0]) < sampling / 5  # assumed rates: far off
    path = next(line for line in r.stdout.splitlines() if line.startswith("critical path:"))
    assert "chain replace_multiple__model=llama2-126m" in path, path
    assert "llama2-126m: decoding 15,774 tokens/s per GPU (assumed by model size), " \
        "training at 50% MFU (--mfu)" in r.stdout  # the H100 figure scaled to an A100


def test_dry_run_takes_rates_measured_by_the_gpu_check(tmp_path):
    """bench/gpu_check.py's JSON (--rates): its decode rate and MFU per model replace the
    assumptions for those models, named with the device and date; per-model flags win."""
    import json

    figures = {"device": "NVIDIA H200", "date": "2026-12-24",
               "inner": {"decode_tps": {"llama2-126m": 400000.0},
                         "mfu": {"llama2-126m": 0.31, "gpt2-9m": None}}}
    (tmp_path / "gpu.json").write_text(json.dumps(figures))
    r = collapse("run", "studies/tinystories_paper.yaml", "--dry-run", "--gpu", "H200",
                 "--rates", tmp_path / "gpu.json", "--decode-tps", "gpt2-9m=250000")
    assert r.returncode == 0, r.stderr
    assert "llama2-126m: decoding 400,000 tokens/s per GPU (measured by bench/gpu_check.py " \
        "on NVIDIA H200, 2026-12-24), training at 31% MFU (measured by bench/gpu_check.py " \
        "on NVIDIA H200, 2026-12-24)" in r.stdout
    assert "gpt2-9m: decoding 250,000 tokens/s per GPU (stated on the command line), " \
        "training at 15% MFU (assumed by model size)" in r.stdout
    faster = float(r.stdout.split("critical path: ")[1].split(" h")[0])
    slower = collapse("run", "studies/tinystories_paper.yaml", "--dry-run", "--gpu", "H200")
    assert float(slower.stdout.split("critical path: ")[1].split(" h")[0]) > 1.5 * faster


@pytest.mark.slow
def test_quickstart_plan_counts_tokens(tmp_path):
    r = collapse("run", "studies/quickstart.yaml", "--dry-run")
    assert r.returncode == 0 and "T = 400 stories per generation" in r.stdout
    assert "train flops" in r.stdout and "-" not in r.stdout.split("total:")[1].split("\n")[0]


def test_workflows_are_planned_and_fresh_real_data_needs_T_stated(tmp_path):
    f = write_study(tmp_path / "s.yaml", "name: p\nfamily: {name: linear, d: 3, T: 20}\n"
                    "strategies: [{name: growing, real: {fraction: 1.0}, real_data: growing, "
                    "synthetic: {fraction: 0.2}}]\ngenerations: 3\nseeds: [0]\n")
    rows = generation_rows(load_study(f)).set_index("generation")
    assert rows["train_rows"].tolist() == [20, 50, 75]  # 20 + 20 real, +10; 60 real, +15
    assert rows["sample_rows"].tolist() == [10, 15, 0]
    # An LM study whose strategy reads a fresh real chunk each generation: T is the
    # stated train_stories, never silently divided among the chunks; unset, the plan
    # (and the run) refuse with the field to set.
    lm = write_study(tmp_path / "lm.yaml", "name: lm\nfamily: {name: lm, data: grammar, "
                     "stories: 500, test_stories: 100}\nstrategies: [accumulate_fresh_real]\n"
                     f"generations: 4\nseeds: [0]\nout: {tmp_path / 'out'}\n")
    r = collapse("run", lm, "--dry-run")
    assert r.returncode == 2 and "family.train_stories: strategy accumulate_fresh_real reads 4 " \
        "real chunk(s) of T = 400 rows; the data has 400: set train_stories to at most 100" \
        in r.stderr, r.stderr
    r = collapse("run", lm, "--dry-run", "--set", "family.train_stories=100")
    assert r.returncode == 0 and "T = 100 stories per generation" in r.stdout, r.stderr


def test_the_dry_run_says_how_it_prices_loss_weights_and_a_truncated_loss():
    """Weights and truncated cross-entropy change what a row's loss counts, not what
    passes through the model: the dry run prices them as the plain loss, and says so."""
    from engine.plan import describe

    weighted = describe(load_study("studies/weighted_lm.yaml"))
    assert "loss weights: golden (real 0.618, synthetic 0.382) is priced as its mix " \
        "unweighted" in weighted and "loss weights: equal" not in weighted
    truncated = describe(load_study("studies/truncated_ce.yaml"))
    assert "loss: name:truncated_ce,threshold:0.5; name:truncated_ce,threshold:0.9 from " \
        "generation 2 is priced as the plain loss" in truncated
    plain = describe(load_study("studies/quickstart.yaml"))
    assert "loss weights" not in plain and "\nloss:" not in plain
    rows = generation_rows(load_study("studies/truncated_ce.yaml"))
    later = rows[rows.generation > 1]  # (generation 1 is one shared plain-loss fit)
    assert later.groupby("generation").train_flops.nunique().eq(1).all()  # priced alike
