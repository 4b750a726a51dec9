"""Tail and variety metrics of a sampled corpus (engine/families/lm/tails.py), exact on
constructed corpora."""
import numpy as np
import pyarrow as pa
import pytest

from engine.families.lm import tails


def corpus(stories):
    return pa.table({"_row": pa.array(np.arange(len(stories)), pa.int64()),
                     "ids": pa.array(stories, pa.list_(pa.int32())),
                     "n_tokens": pa.array([len(s) for s in stories], pa.int64())})


def test_zipf_slope_of_an_exact_power_law():
    # token r appears round(10000 / r) times: slope -1
    stories = [[r] * round(10000 / r) for r in range(1, 60)]
    stats = tails.merge([tails.partial(corpus(stories))], None)
    assert stats["zipf_slope"] == pytest.approx(-1.0, abs=0.01)
    steeper = [[r] * round(10000 / r**2) for r in range(1, 40)]
    assert tails.merge([tails.partial(corpus(steeper))], None)["zipf_slope"] == \
        pytest.approx(-2.0, abs=0.05)


def test_rare_token_mass_against_the_real_tail():
    real = {1: 50, 2: 30, 3: 10, 4: 6, 5: 4}  # tokens 4 and 5: the rarest 10%
    rare = tails.rare_tokens(real, 0.10)
    assert rare.tolist() == [4, 5]
    like_real = [[1] * 50 + [2] * 30 + [3] * 10 + [4] * 6 + [5] * 4]
    assert tails.merge([tails.partial(corpus(like_real))], rare)["rare_token_mass"] == \
        pytest.approx(0.10)
    collapsed = [[1] * 60 + [2] * 40]  # the tail is gone
    assert tails.merge([tails.partial(corpus(collapsed))], rare)["rare_token_mass"] == 0.0


def test_rep_4_and_self_bleu():
    loop = [1, 2, 3, 4] * 5  # 17 4-grams, 4 distinct
    fresh = list(range(20))
    stats = tails.merge([tails.partial(corpus([loop, fresh]))], None)
    assert stats["rep_4"] == pytest.approx(((1 - 4 / 17) + 0.0) / 2)
    same = [list(range(10, 40))] * 5
    assert tails.self_bleu(same) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    varied = [rng.integers(0, 5000, 30).tolist() for _ in range(20)]
    assert tails.self_bleu(varied) < 0.05
    # batches merge: the first stories by request number, wherever they arrived
    a, b = corpus(same[:3]), corpus(same[3:])
    b = b.set_column(0, "_row", pa.array([3, 4], pa.int64()))
    assert tails.merge([tails.partial(b), tails.partial(a)], None)["self_bleu"] == \
        pytest.approx(1.0)
