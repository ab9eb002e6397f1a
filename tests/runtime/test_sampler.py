"""The sampler against transformers' logits processors (the reference kiln promises to follow) and
against softmax(logits / T) for the frequencies of its draws."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from kiln.errors import ConfigError
from kiln.llmapi.sampling_params import SamplingParams
from kiln.runtime.sampler import apply_repetition_penalty, filter_logits, filter_logits_batch, sample_batch
from kiln.runtime.sequence import Sequence


def _seq(params, seen=(), seed=0) -> Sequence:
    """A sequence whose context (prompt) is `seen`."""
    return Sequence(0, list(seen), params, max_len=10**6, seed=seed)


def sample_token(logits, params, seen, seq_or_seed) -> int:
    seq = seq_or_seed if isinstance(seq_or_seed, Sequence) else _seq(params, seen, seq_or_seed or 0)
    return sample_batch(logits[None], [seq])[0]


def _hf_filter(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
               min_p: float = 0.0) -> torch.Tensor:
    """Temperature, then top-k, then top-p, then min-p: the order of transformers' generate()."""
    scores = (logits / temperature)[None]
    if top_k > 0:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    if min_p > 0:
        scores = MinPLogitsWarper(min_p)(None, scores)
    return scores[0]


def _random_logits(seed: int, vocab: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * scale


def test_greedy_is_argmax():
    for seed in range(50):
        logits = _random_logits(seed, 1000)
        params = SamplingParams(temperature=0, top_k=5, top_p=0.5)  # filters do not matter when greedy
        assert sample_token(logits, params, [], seed) == int(logits.argmax())


@pytest.mark.parametrize("top_k, top_p, min_p", [
    (1, 1.0, 0.0), (10, 1.0, 0.0), (999, 1.0, 0.0), (0, 0.9, 0.0), (0, 0.3, 0.0), (0, 0.01, 0.0), (50, 0.8, 0.0),
    (5, 0.99, 0.0), (1000, 1.0, 0.0), (2000, 0.5, 0.0), (0, 1.0, 0.05), (0, 1.0, 0.5), (0, 1.0, 1.0),
    (20, 0.9, 0.1), (0, 0.95, 0.02)])
def test_filter_logits_equals_transformers_warpers(top_k, top_p, min_p):
    min_p_dropped = 0  # tokens that top-k and top-p keep and min-p drops
    for seed in range(20):
        logits = _random_logits(seed, 1000)
        temperature = 0.5 + seed / 10
        ours = filter_logits(logits / temperature, top_k, top_p, min_p)
        theirs = _hf_filter(logits, temperature, min(top_k, 1000), top_p, min_p)
        min_p_dropped += int(torch.isinf(ours).sum() - torch.isinf(filter_logits(logits / temperature, top_k,
                                                                                    top_p)).sum())
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert (min_p_dropped > 0) == (min_p > 0)  # the check has power where min-p is on


def test_filter_does_not_change_its_input():
    logits = _random_logits(0, 100)
    before = logits.clone()
    filter_logits(logits, 5, 0.5, 0.1)
    assert torch.equal(logits, before)


@pytest.mark.parametrize("penalty", [1.3, 0.7, 2.0])
def test_repetition_penalty_equals_transformers(penalty):
    for seed in range(20):
        logits = _random_logits(seed, 500)
        g = torch.Generator().manual_seed(seed)
        seen = torch.randint(0, 500, (40,), generator=g)  # with repeats, as a real context has
        theirs = RepetitionPenaltyLogitsProcessor(penalty)(seen[None], logits[None].clone())[0]
        ours = apply_repetition_penalty(logits.clone(), torch.unique(seen), penalty)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_repetition_penalty_changes_the_greedy_choice_like_transformers():
    moved = 0
    for seed in range(30):
        logits = _random_logits(seed, 200)
        seen = torch.topk(logits, 3).indices.tolist() + [7, 7, 150]
        expected = int(RepetitionPenaltyLogitsProcessor(1.8)(torch.tensor([seen]), logits[None].clone())[0].argmax())
        params = SamplingParams(temperature=0, repetition_penalty=1.8)
        assert sample_token(logits, params, seen, None) == expected
        moved += expected != int(logits.argmax())
    assert moved >= 10  # the penalty really changed the choice in many cases


def _draws(logits, params, seed, count):
    seq = _seq(params, seed=seed)  # one stream, advanced by every draw
    return [sample_token(logits, params, [], seq) for _ in range(count)]


def test_batched_filter_equals_the_row_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 300, generator=g) * 3
    top_k = torch.tensor([0, 1, 7, 0, 50, 400])
    top_p = torch.tensor([1.0, 1.0, 0.9, 0.3, 0.8, 0.05])
    min_p = torch.tensor([0.0, 0.3, 0.0, 0.05, 0.2, 1.0])
    ours = filter_logits_batch(logits, top_k, top_p, min_p)
    for row, k, p, mp in zip(range(6), top_k.tolist(), top_p.tolist(), min_p.tolist()):
        assert torch.equal(ours[row], filter_logits(logits[row], k, p, mp)), (k, p, mp)
    assert torch.equal(filter_logits_batch(logits, top_k, top_p), filter_logits_batch(logits, top_k, top_p, 0 * min_p))


def test_a_seeded_row_draws_the_same_whatever_runs_beside_it():
    logits = _random_logits(5, 400, scale=1.0)
    params = SamplingParams(temperature=1.0, seed=11)
    alone = [sample_batch(logits[None], [s])[0] for s in [_seq(params, seed=11)] for _ in range(20)]
    seq, other = _seq(params, seed=11), _seq(SamplingParams(temperature=0.8, top_k=3), seed=99)
    greedy = _seq(SamplingParams(temperature=0))
    beside = [sample_batch(torch.stack([logits, logits, logits]), [other, seq, greedy])[1] for _ in range(20)]
    assert alone == beside


def test_seeded_sampling_repeats_and_differs_across_seeds():
    logits = _random_logits(0, 1000, scale=1.0)
    params = SamplingParams(temperature=1.0, top_p=0.95)
    a, b, c = _draws(logits, params, 1234, 50), _draws(logits, params, 1234, 50), _draws(logits, params, 1235, 50)
    assert a == b
    assert a != c


@pytest.mark.parametrize("temperature, top_k, top_p, min_p", [
    (0.7, 0, 1.0, 0.0), (1.5, 6, 1.0, 0.0), (1.0, 0, 0.8, 0.0), (0.9, 7, 0.9, 0.0), (1.0, 0, 1.0, 0.3)])
def test_sampling_frequencies_match_the_filtered_softmax(temperature, top_k, top_p, min_p):
    """N draws: each frequency is Binomial(N, p)/N with std <= 0.5/sqrt(N); 5 std (0.018 at N=20000) bounds all
    10 tokens with a false alarm chance below 1e-5, while a wrong temperature or filter moves some p by > 0.05."""
    n = 20000
    logits = _random_logits(3, 10, scale=1.5)
    expected = _hf_filter(logits, temperature, top_k, top_p, min_p).softmax(-1)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    counts = torch.bincount(torch.tensor(_draws(logits, params, 7, n)), minlength=10).double()
    freq = counts / n
    assert torch.all(counts[expected == 0] == 0)  # filtered tokens are never drawn
    assert float((freq - expected.double()).abs().max()) <= 5 * 0.5 / math.sqrt(n)
    # The check has power: the unfiltered T=1 distribution is far from the expected one.
    assert float((logits.softmax(-1) - expected).abs().max()) > 0.05


@pytest.mark.parametrize("vocab", [128256, 32000, 151936, 1000, 50257])
def test_greedy_tokens_equal_argmax_with_ties_inside_and_across_chunks(vocab):
    from kiln.runtime.sampler import greedy_tokens

    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(6, vocab, generator=g)
    top = logits.max() + 1
    logits[1, [5, vocab - 1]] = top  # a tie across chunks: the first wins
    logits[2, [vocab // 2, vocab // 2 + 1]] = top  # a tie inside one chunk
    logits[3] = 0.0  # all equal: index 0
    logits[4, vocab - 1] = top  # the last index
    assert torch.equal(greedy_tokens(logits), logits.argmax(-1))
    assert torch.equal(greedy_tokens(logits[0]), logits[0].argmax(-1))  # one row, no batch dim
    assert torch.equal(greedy_tokens(logits.bfloat16()), logits.bfloat16().argmax(-1))


def test_logit_bias_adds_to_the_logits_before_the_choice():
    """OpenAI's logit_bias: +100 forces a token, -100 bans the argmax, a small bias reorders close logits; the
    sampled distribution is the biased softmax (the same draw as unbiased logits with the bias added by hand)."""
    logits = _random_logits(3, 50)
    best = int(logits.argmax())
    greedy = SamplingParams(temperature=0)
    assert sample_token(logits, SamplingParams(temperature=0, logit_bias={7: 100.0}), (), 0) == 7
    banned = sample_token(logits, SamplingParams(temperature=0, logit_bias={best: -100.0}), (), 0)
    assert banned == int(logits.masked_fill(torch.arange(50) == best, float("-inf")).argmax())
    second = int(logits.topk(2).indices[1])
    gap = float(logits[best] - logits[second])
    assert sample_token(logits, SamplingParams(temperature=0, logit_bias={second: gap + 0.01}), (), 0) == second
    assert sample_token(logits, greedy, (), 0) == best  # (the row itself is left as it was)
    biased = logits.clone()
    biased[[4, 9]] += torch.tensor([2.5, -1.0])
    params = SamplingParams(temperature=0.8, seed=5, logit_bias={4: 2.5, 9: -1.0})
    assert _draws(logits, params, 5, 20) == _draws(biased, SamplingParams(temperature=0.8, seed=5), 5, 20)


def test_min_tokens_masks_the_stop_tokens_until_reached():
    """vLLM's min_tokens: EOS and stop_token_ids cannot be drawn before min_tokens outputs; after, they can."""
    logits = _random_logits(4, 30)
    stop = int(logits.argmax())
    params = SamplingParams(temperature=0, max_tokens=8, min_tokens=2)
    seq = Sequence(0, [1, 2], params, max_len=100, seed=0, stop_ids=frozenset({stop}))
    assert sample_batch(logits[None], [seq])[0] != stop
    seq.output_ids += [5]
    assert sample_batch(logits[None], [seq])[0] != stop
    seq.output_ids += [6]
    assert sample_batch(logits[None], [seq])[0] == stop
    assert not seq.queueable  # the mask is applied on the host's side of sampling


def test_logit_bias_and_min_tokens_are_checked():
    for bad in ({-1: 1.0}, {3: 101.0}, {"3": 1.0}, [(3, 1.0)]):
        with pytest.raises(ConfigError, match="SamplingParams.logit_bias"):
            SamplingParams(logit_bias=bad)
    with pytest.raises(ConfigError, match=r"SamplingParams.min_tokens must be an integer in \[0, max_tokens \(4\)\]"):
        SamplingParams(max_tokens=4, min_tokens=5)
