"""Speculative decoding by n-gram lookup (prompt lookup): draft tokens copied from the sequence itself, checked by
the model in one step.

A decoding sequence's last few tokens are looked up among its earlier tokens (prompt and output); where they
occurred before, the tokens that followed them then are its draft for what follows now. The step runs the
sequence's next token and its d draft tokens together, as 1 + d decode rows, row j attending to the j before it
(kiln.runtime.executor.draft_rows), so it has the logits of every position. Greedy decoding takes the model's
own argmax at each: the draft tokens that match it are accepted up to the first miss, and the argmax there comes
free. So a step makes 1 to d + 1 tokens, each the one plain greedy
decoding would make; the keys and values written for the rejected tail sit past the sequence's cached tokens,
where the next step writes over them.

Sampling accepts a draft token t with the probability p(t) the model gives it there, and where it refuses one,
samples that position from p with t taken out. This is speculative sampling (Leviathan et al., Chen et al.,
2023) with a draft that puts all its mass on t, so every token comes from exactly the distribution plain sampling
draws it from (the same temperature, top-k and top-p), though not the same token for the same seed.

It pays where outputs copy their inputs (editing, extraction, summaries that quote, code that repeats names):
batch-1 decode reads every weight once a step whatever the step's width, so accepted tokens cost almost nothing.
No draft model: nothing to load, train or keep in step with the target.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Lengths of the suffix looked up, longest first: a longer match predicts better, a one-token one more often.
NGRAM_SIZES = (3, 2, 1)


@dataclass
class NgramIndex:
    """One sequence's n-grams of NGRAM_SIZES, each mapped to where its latest occurrence ends, built as the
    sequence grows (each token is indexed once)."""

    ends: dict[tuple[int, ...], int] = field(default_factory=dict)
    indexed: int = 0  # n-grams ending at positions < indexed are in `ends`

    def draft(self, ids: list[int], max_len: int) -> list[int]:
        """Up to max_len tokens that followed the latest earlier occurrence of ids' longest suffix found."""
        if max_len <= 0:
            return []
        last = len(ids) - 1  # index every n-gram ending before the suffix's own end, so it cannot find itself
        for end in range(max(self.indexed, 1), last + 1):
            for n in NGRAM_SIZES:
                if end >= n:
                    self.ends[tuple(ids[end - n:end])] = end
        self.indexed = max(self.indexed, last + 1)
        for n in NGRAM_SIZES:
            end = self.ends.get(tuple(ids[-n:])) if len(ids) > n else None
            if end is not None:
                return ids[end:end + max_len]
        return []


def accept_greedy(draft: list[int], targets: list[int]) -> list[int]:
    """The tokens a step makes: the draft's tokens up to its first that differs from the model's choice there
    (targets: the model's token at each of the step's 1 + len(draft) positions), then the model's next."""
    taken = 0
    while taken < len(draft) and draft[taken] == targets[taken]:
        taken += 1
    return draft[:taken] + [targets[taken]]


def accept_sampled(draft: list[int], probs: torch.Tensor, generator: torch.Generator) -> list[int]:
    """The tokens a sampled step makes: each draft token taken with its probability, up to the first refused;
    that position (or, all taken, the one after the draft) sampled from its distribution without the refused
    token. probs: [1 + len(draft), vocab], what each position samples from (kiln.runtime.sampler.sampling_probs)."""
    taken = 0
    if draft:
        chance = probs[:len(draft)].gather(1, torch.tensor(draft, device=probs.device)[:, None])[:, 0]
        draws = torch.rand(len(draft), generator=generator, device=probs.device)
        kept = (draws < chance).tolist()
        taken = kept.index(False) if False in kept else len(draft)
    p = probs[taken]
    if taken < len(draft):
        p = p.clone()
        p[draft[taken]] = 0  # (no need to renormalize: the exponential race below picks by ratio)
    noise = torch.empty_like(p).exponential_(generator=generator)
    return draft[:taken] + [int((p / noise.clamp_min_(1e-30)).argmax())]
