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


def test_bad_generation_and_unknown_strategy():
    with pytest.raises(ValueError):
        S.get("replace").mix(0, T)
    with pytest.raises(KeyError, match="known: replace, accumulate"):
        S.get("acumulate")
