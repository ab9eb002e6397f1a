"""Token sampling on the reference path: repetition penalty, temperature, top-k, top-p, seeded draws.

The filters follow Hugging Face's logits processors so that a kiln run and a transformers run with
the same settings pick from the same distribution.
"""

from __future__ import annotations

import torch


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (arXiv:1909.05858): divide positive logits of seen tokens, multiply negative ones."""
    scores = logits[seen]
    logits[seen] = torch.where(scores > 0, scores / penalty, scores * penalty)
    return logits


def top_k_top_p_filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) the tokens outside the top k and outside the smallest set whose mass reaches top_p."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative <= 1 - top_p
        drop_sorted[-1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop_sorted.scatter(0, order, drop_sorted), float("-inf"))
    return logits


def apply_presence_frequency_penalty(logits: torch.Tensor, output_tokens: list[int], presence: float,
                                     frequency: float) -> torch.Tensor:
    """OpenAI's penalties over the generated tokens: minus presence once, minus frequency per occurrence."""
    ids, counts = torch.tensor(output_tokens, device=logits.device).unique(return_counts=True)
    logits[ids] -= presence + frequency * counts.to(logits.dtype)
    return logits


def sample_token(logits: torch.Tensor, params, seen_tokens: list[int], generator: torch.Generator | None,
                 output_tokens: list[int] = ()) -> int:
    """Pick the next token from one sequence's logits [vocab]. seen_tokens (prompt and output) feed the
    repetition penalty; output_tokens the presence and frequency penalties."""
    logits = logits.float().clone()
    if params.repetition_penalty != 1.0 and seen_tokens:
        seen = torch.tensor(sorted(set(seen_tokens)), device=logits.device)
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and output_tokens:
        logits = apply_presence_frequency_penalty(logits, list(output_tokens), params.presence_penalty,
                                                  params.frequency_penalty)
    if params.greedy:
        return int(logits.argmax())
    logits = top_k_top_p_filter(logits / params.temperature, params.top_k, params.top_p)
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def make_generator(seed: int | None) -> torch.Generator:
    """A per-request generator: seeded requests repeat exactly, whatever else runs beside them."""
    generator = torch.Generator()
    generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,))))
    return generator


def token_logprobs(logits: torch.Tensor, token: int, top_n: int) -> tuple[float, list[tuple[int, float]]]:
    """Log-probability of the chosen token under the model's distribution, and the top_n alternatives."""
    logprobs = logits.float().log_softmax(-1)
    top = torch.topk(logprobs, top_n) if top_n else None
    alternatives = [] if top is None else list(zip(top.indices.tolist(), top.values.tolist()))
    return float(logprobs[token]), alternatives
