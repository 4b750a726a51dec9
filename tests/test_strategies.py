"""Each strategy's training mix and sample size, as pure functions of (g, T)."""
import pytest

from engine import strategies as S
from engine.strategies import Part, real, synthetic

T = 50
ALL = list(S.STRATEGIES)


@pytest.mark.parametrize("name", ALL)
def test_generation_one_trains_on_real_data_alone(name):
    mix = S.get(name).mix(1, T)
    assert mix.parts == (Part(real(1), T),) and mix.draw == "all" and mix.rows == T


def test_replace_uses_only_the_previous_generation():
    for g in range(2, 6):
        mix = S.get("replace").mix(g, T)
        assert mix.parts == (Part(synthetic(g - 1), T),) and mix.rows == T
        assert S.get("replace").sample_size(g, T) == T


def test_accumulate_keeps_real_and_every_earlier_generation():
    mix = S.get("accumulate").mix(4, T)
    assert mix.parts == (Part(real(1), T), Part(synthetic(1), T), Part(synthetic(2), T),
                         Part(synthetic(3), T))
    assert mix.draw == "all" and mix.rows == 4 * T


def test_replace_multiple_fits_g_times_T_samples_of_the_previous_model():
    s = S.get("replace_multiple")
    for g in range(2, 6):
        assert s.mix(g, T).parts == (Part(synthetic(g - 1), g * T),)
    # model g must therefore produce (g+1)·T samples for generation g+1
    for g in range(1, 6):
        assert s.sample_size(g, T) == (g + 1) * T == s.mix(g + 1, T).parts[0].rows


@pytest.mark.parametrize("name,draw", [("subsample", "without_replacement"),
                                       ("subsample_with_replacement", "with_replacement")])
def test_subsample_draws_a_fixed_budget_from_the_accumulated_pool(name, draw):
    mix = S.get(name).mix(5, T)
    assert mix.draw == draw and mix.rows == T and mix.pool_rows == 5 * T
    assert [p.source for p in mix.parts] == [real(1)] + [synthetic(k) for k in range(1, 5)]


def test_accumulate_fresh_real_adds_a_new_real_chunk_each_generation():
    s = S.get("accumulate_fresh_real")
    mix = s.mix(3, T)
    assert [p.source for p in mix.parts] == [real(1), real(2), real(3), synthetic(1), synthetic(2)]
    assert mix.rows == 5 * T
    assert s.real_chunks(7) == 7
    assert S.get("accumulate").real_chunks(7) == 1


def workflow(**definition):
    return S.workflow("mine", definition)


def test_workflow_constant_real_fraction_keeps_T_rows_per_generation():
    s = workflow(real={"fraction": 0.3})  # Bertrand et al.: λ real, the rest synthetic
    assert s.mix(1, 100).parts == (Part(real(1), 100),)
    for g in range(2, 6):
        assert s.mix(g, 100).parts == (Part(real(1), 30), Part(synthetic(g - 1), 70))
        assert s.sample_size(g - 1, 100) == 70  # model g-1 samples what generation g reads
    assert s.real_chunks(5) == 1 and not s.fresh_real


def test_workflow_schedules_decay_the_real_share():
    exponential = workflow(real={"fraction": 0.8, "schedule": "exponential", "decay": 0.5})
    assert [exponential.mix(g, 100).parts[0].rows for g in range(2, 6)] == [80, 40, 20, 10]
    assert exponential.mix(5, 100).parts[1] == Part(synthetic(4), 90)
    linear = workflow(real={"fraction": 0.8, "schedule": "linear", "decay": 0.25})
    assert [linear.mix(g, 100).rows for g in range(2, 8)] == [100] * 6
    assert [linear.mix(g, 100).parts[0].rows for g in range(2, 6)] == [80, 60, 40, 20]
    # none left at generation 6: pure synthetic, as replace
    assert linear.mix(6, 100).parts == (Part(synthetic(5), 100),)


def test_workflow_counts_set_real_and_synthetic_separately():
    s = workflow(real={"rows": 10}, synthetic={"rows": 40})  # Kazdan et al.
    assert s.mix(3, 100).parts == (Part(real(1), 10), Part(synthetic(2), 40))
    assert s.sample_size(1, 100) == 40 and s.mix(3, 100).rows == 50


def test_workflow_fresh_real_reads_a_new_chunk_each_generation():
    s = workflow(real={"fraction": 0.5}, real_data="fresh")  # Alemohammad et al.
    assert s.mix(3, 100).parts == (Part(real(3), 50), Part(synthetic(2), 50))
    assert s.real_chunks(6) == 6


def test_workflow_growing_real_keeps_a_constant_synthetic_share():
    # Dohmatob et al.: a small synthetic fraction in real data that grows
    s = workflow(real={"fraction": 1.0}, real_data="growing", synthetic={"fraction": 0.2})
    for g in range(2, 6):
        mix = s.mix(g, 100)
        assert [p.source for p in mix.parts] == [real(k) for k in range(1, g + 1)] + [synthetic(g - 1)]
        assert mix.parts[-1].rows == 25 * g and mix.parts[-1].rows / mix.rows == 0.2
        assert s.sample_size(g - 1, 100) == 25 * g


def test_workflow_refuses_a_generation_without_synthetic_rows_and_oversized_chunks():
    with pytest.raises(ValueError, match="generation 2 gets no synthetic rows"):
        workflow(real={"fraction": 1.0}).mix(2, 100)
    with pytest.raises(ValueError, match="exceed a real chunk's T = 100 rows"):
        workflow(real={"rows": 150}, synthetic={"rows": 10}).mix(2, 100)


def test_bad_generation_and_unknown_strategy():
    with pytest.raises(ValueError):
        S.get("replace").mix(0, T)
    with pytest.raises(KeyError, match="known: replace, accumulate"):
        S.get("acumulate")


def test_workflow_loss_weights_give_each_kind_its_share_of_the_objective():
    from engine.strategies import workflow

    s = workflow("w", {"name": "w", "real": {"fraction": 0.25}, "real_data": "fresh",
                       "weights": {"real": 0.6, "synthetic": 0.4}})
    assert s.mix(1, 100).weights is None  # generation 1: real rows alone
    mix = s.mix(3, 100)
    assert mix.weights == (0.6, 0.4) and "loss weights real 0.6, synthetic 0.4" in s.description
    per_row = mix.row_weights({"real": 25, "synthetic": 75})
    # the real rows' total weight is 0.6 of the whole, the synthetic rows' 0.4; mean 1
    assert per_row["real"] * 25 / 100 == pytest.approx(0.6)
    assert per_row["synthetic"] * 75 / 100 == pytest.approx(0.4)
    assert mix.row_weights({"real": 25}) == {"real": 1.0}  # a kind missing drops out
    assert workflow("u", {"name": "u", "real": {"fraction": 0.5}}).mix(2, 10).row_weights(
        {"real": 5, "synthetic": 5}) is None


def test_a_weighted_mix_read_from_the_store_carries_each_rows_weight(tmp_path):
    import pyarrow as pa

    from engine.corpus import WEIGHT, CorpusStore
    from engine.strategies import real, synthetic, workflow

    store = CorpusStore(tmp_path)
    store.write(real(2), pa.table({"x": [1.0, 2.0, 3.0, 4.0]}), model="real data")
    store.write(synthetic(1), pa.table({"x": [9.0] * 6}), model="gen-1")
    mix = workflow("w", {"name": "w", "real": {"rows": 4}, "real_data": "fresh",
                         "synthetic": {"rows": 6},
                         "weights": {"real": 1, "synthetic": 1}}).mix(2, 4)
    table = store.read(mix, seed=0)
    assert table.column("x").to_pylist() == [1.0, 2.0, 3.0, 4.0] + [9.0] * 6
    # equal kind weights: each kind half the objective, so a real row weighs 6/4 of a
    # synthetic one; the mean row weight is 1
    w = table.column(WEIGHT).to_pylist()
    assert w[:4] == [1.25] * 4 and w[4:] == pytest.approx([10 / 12] * 6)


def test_a_weighted_mix_streamed_weighs_each_kind_by_its_share_of_tokens(tmp_path, ray_local):
    """The language models' loss is a mean over tokens, so a kind's weight is spread over
    its tokens (weight_unit n_tokens): with equal kind weights, the real stories' tokens
    carry half the weighted token count, whatever the stories' lengths. The same rows
    and weights in this process (stream) and through Ray Data (dataset); an unweighted
    mix's rows carry none."""
    import pyarrow as pa

    from engine.corpus import WEIGHT, CorpusStore
    from engine.strategies import real, synthetic, workflow

    store = CorpusStore(tmp_path)
    store.write(real(2), pa.table({"x": [1.0, 2.0], "n_tokens": [10, 30]}), model="real data")
    store.write(synthetic(1), pa.table({"x": [9.0] * 4, "n_tokens": [5] * 4}), model="gen-1")
    mix = workflow("w", {"name": "w", "real": {"rows": 2}, "real_data": "fresh",
                         "synthetic": {"rows": 4},
                         "weights": {"real": 1, "synthetic": 1}}).mix(2, 2)
    rows = [t for t in store.stream(mix, 0, weight_unit="n_tokens").tables(["x", "n_tokens"], 0)]
    table = pa.concat_tables(rows)
    by_kind = {}
    for x, n, w in zip(*(table.column(c).to_pylist() for c in ("x", "n_tokens", WEIGHT))):
        by_kind.setdefault(x == 9.0, []).append((n, w))
    real_share = sum(n * w for n, w in by_kind[False])
    synthetic_share = sum(n * w for n, w in by_kind[True])
    assert real_share == pytest.approx(synthetic_share)  # equal kind weights
    assert real_share + synthetic_share == pytest.approx(60)  # a token weighs 1 on average
    streamed = sorted((r["x"], r["n_tokens"], r[WEIGHT]) for r in table.to_pylist())
    from_ray = sorted((r["x"], r["n_tokens"], r[WEIGHT]) for r in store.dataset(
        mix, 0, shuffle_files=True, weight_unit="n_tokens").iter_rows())
    assert from_ray == streamed  # 0.75 and 1.5: exact in float32
    assert sorted(set(streamed)) == [(1.0, 10, 0.75), (2.0, 30, 0.75), (9.0, 5, 1.5)]
    by_rows = pa.concat_tables(store.stream(mix, 0).tables(["x"], 0))  # rows as the unit
    assert sorted(set(zip(*(by_rows.column(c).to_pylist() for c in ("x", WEIGHT))))) == \
        [(1.0, 1.5), (2.0, 1.5), (9.0, 0.75)]
    plain = workflow("u", {"name": "u", "real": {"rows": 2}, "real_data": "fresh",
                           "synthetic": {"rows": 4}}).mix(2, 2)
    assert all(WEIGHT not in t.column_names for t in store.stream(plain, 0).tables(["x"], 0))
