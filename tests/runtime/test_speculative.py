"""The n-gram drafts of speculative decoding, against a search written out here."""

from __future__ import annotations

import random

import pytest
import torch

from kiln.runtime.speculative import NGRAM_SIZES, NgramIndex, accept_greedy, accept_sampled


def searched_draft(ids: list[int], max_len: int) -> list[int]:
    """The longest suffix (of NGRAM_SIZES) that occurred before, at its latest earlier end: what followed it."""
    for n in NGRAM_SIZES:
        if len(ids) <= n:
            continue
        suffix = ids[-n:]
        for end in range(len(ids) - 1, n - 1, -1):
            if ids[end - n:end] == suffix:
                return ids[end:end + max_len]
    return []


@pytest.mark.parametrize("vocab", [2, 5, 40])  # few symbols: matches everywhere; many: rare ones
def test_drafts_equal_a_search_as_the_sequence_grows(vocab):
    rng = random.Random(vocab)
    for _ in range(20):
        index, ids = NgramIndex(), [rng.randrange(vocab) for _ in range(rng.randrange(1, 6))]
        for _ in range(60):
            max_len = rng.randrange(0, 6)
            assert index.draft(ids, max_len) == searched_draft(ids, max_len), ids
            ids += [rng.randrange(vocab) for _ in range(rng.choice((1, 1, 1, 4)))]  # a step may add several


def test_the_longest_suffix_wins_and_the_latest_occurrence():
    ids = [1, 2, 3, 9, 2, 3, 8, 5, 2, 3]
    assert NgramIndex().draft(ids, 2) == [8, 5]  # (5, 2, 3) never occurred before; (2, 3) last ended before 8
    ids = [4, 2, 3, 7, 1, 2, 3, 6, 4, 2, 3]
    assert NgramIndex().draft(ids, 3) == [7, 1, 2]  # (4, 2, 3) beats the later (2, 3)


def test_a_suffix_never_finds_itself():
    assert NgramIndex().draft([1, 2, 3], 4) == []
    assert NgramIndex().draft([5, 5], 4) == [5]  # (5,) ended at position 1: one token follows it


@pytest.mark.parametrize("draft,targets,made", [
    ([], [7], [7]),
    ([1, 2, 3], [1, 2, 3, 4], [1, 2, 3, 4]),
    ([1, 2, 3], [1, 9, 3, 4], [1, 9]),
    ([1, 2, 3], [8, 2, 3, 4], [8]),
])
def test_accept_greedy_stop_at_the_first_miss(draft, targets, made):
    assert accept_greedy(draft, targets) == made


def test_sampled_drafts_leave_each_position_its_own_distribution():
    """Speculative sampling's promise: the first token is distributed as probs[0]; after draft token a the second
    as probs[1]; after a and b the third as probs[2], whatever the draft (checked by frequency over many draws)."""
    probs = torch.tensor([[0.10, 0.45, 0.05, 0.30, 0.10, 0.00],
                          [0.25, 0.05, 0.40, 0.10, 0.00, 0.20],
                          [0.00, 0.30, 0.10, 0.10, 0.35, 0.15]])
    a, b, draws = 1, 2, 30_000
    generator = torch.Generator().manual_seed(0)
    made = [accept_sampled([a, b], probs, generator) for _ in range(draws)]
    assert {len(m) for m in made} == {1, 2, 3}
    for position, given in enumerate(([], [a], [a, b])):
        tokens = [m[position] for m in made if m[:position] == given and len(m) > position]
        freq = torch.bincount(torch.tensor(tokens), minlength=6).float() / len(tokens)
        assert (freq - probs[position]).abs().max() < 0.02, (position, freq)
    assert all(m[-1] != 5 for m in made if len(m) == 1)  # a token of probability 0 is never made
