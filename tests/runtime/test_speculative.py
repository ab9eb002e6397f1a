"""The n-gram drafts of speculative decoding, against a search written out here."""

from __future__ import annotations

import random

import pytest

from kiln.runtime.speculative import NGRAM_SIZES, NgramIndex, accepted_tokens


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
def test_accepted_tokens_stop_at_the_first_miss(draft, targets, made):
    assert accepted_tokens(draft, targets) == made
