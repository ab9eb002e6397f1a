"""Token sampling for a whole batch on the logits' device: penalties, temperature, top-k, top-p, min-p, seeded
draws.

The filters follow Hugging Face's logits processors so that a kiln run and a transformers run with
the same settings pick from the same distribution. `sample_batch` filters every sampled row at once
(one sort) and draws with the exponential race: argmax(p / E) with E ~ Exp(1) i.i.d. picks token i
with probability p_i, so a draw is one noise tensor and an argmax on the GPU, never a host round trip.
Each request's noise comes from its own generator, so seeded requests repeat whatever runs beside them.
"""

from __future__ import annotations

import torch

from kiln.runtime.host_tensors import list_tensor


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (arXiv:1909.05858): divide positive logits of seen tokens, multiply negative ones."""
    scores = logits[seen]
    logits[seen] = torch.where(scores > 0, scores / penalty, scores * penalty)
    return logits


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float, min_p: float = 0.0) -> torch.Tensor:
    """Mask (to -inf) the tokens outside the top k, then outside the smallest set whose mass reaches top_p, then
    those less likely than min_p times the most likely token (transformers' warpers, in generate()'s order)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative <= 1 - top_p
        drop_sorted[-1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop_sorted.scatter(0, order, drop_sorted), float("-inf"))
    if min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    return logits


def apply_presence_frequency_penalty(logits: torch.Tensor, output_tokens: list[int], presence: float,
                                     frequency: float) -> torch.Tensor:
    """OpenAI's penalties over the generated tokens: minus presence once, minus frequency per occurrence."""
    ids, counts = torch.tensor(output_tokens, device=logits.device).unique(return_counts=True)
    logits[ids] -= presence + frequency * counts.to(logits.dtype)
    return logits


def filter_logits_batch(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                        min_p: torch.Tensor | None = None) -> torch.Tensor:
    """Row-wise filter_logits for [rows, vocab] logits (top_k 0, top_p 1 and min_p 0 or None: off), with one
    sort."""
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(-1, descending=True)
    rank = torch.arange(vocab, device=logits.device)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
    kth = sorted_logits.gather(1, (k - 1)[:, None])
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))  # ties with the k-th stay
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # of the tokens ranked above: dropped once it reaches top_p
    drop = (mass_before >= top_p[:, None]) & (rank > 0) & (top_p[:, None] < 1.0)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    if min_p is not None:  # (the most likely token is first: a row's min_p 0 drops nothing)
        probs = sorted_logits.softmax(-1)
        sorted_logits = sorted_logits.masked_fill(probs < min_p[:, None] * probs[:, :1], float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def _apply_penalties(logits: torch.Tensor, seqs) -> torch.Tensor:
    """Each row's penalties, logit bias, (before min_tokens) its stop tokens masked out, and last its JSON mask."""
    for i, seq in enumerate(seqs):
        params = seq.params
        if params.logit_bias:
            ids, bias = zip(*params.logit_bias.items())
            logits[i, list(ids)] += torch.tensor(bias, dtype=logits.dtype, device=logits.device)
        if len(seq.output_ids) < params.min_tokens and seq.stop_ids:
            logits[i, sorted(seq.stop_ids)] = float("-inf")
        if params.repetition_penalty != 1.0 and seq.all_ids:
            seen = torch.tensor(sorted(set(seq.all_ids)), device=logits.device)
            logits[i] = apply_repetition_penalty(logits[i], seen, params.repetition_penalty)
        if (params.presence_penalty or params.frequency_penalty) and seq.output_ids:
            logits[i] = apply_presence_frequency_penalty(logits[i], seq.output_ids, params.presence_penalty,
                                                         params.frequency_penalty)
        if seq.json is not None:  # (last: a closed object takes its stop tokens whatever min_tokens says)
            logits[i] = seq.json.restrict(logits[i], seq.stop_ids)
    return logits


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(-1), the first maximum of each row, in two passes: torch reduces one row on one SM (36 us
    for Llama 3's 128K vocab on an H100, more than a decoder layer's attention), so the row is cut into up to
    256 equal chunks reduced in parallel, then the chunks' maxima. Falls back to one pass when the vocab has
    no power-of-two factor of at least 16."""
    vocab = logits.shape[-1]
    chunks = min(vocab & -vocab, 256)  # the largest power of two dividing vocab, at most 256
    if chunks < 16:
        return logits.argmax(-1)
    width = vocab // chunks
    best, where = logits.view(*logits.shape[:-1], chunks, width).max(-1)  # first maximum within each chunk
    chunk = best.argmax(-1, keepdim=True)  # the first chunk holding the row's maximum
    return (chunk * width + where.gather(-1, chunk)).squeeze(-1)


def sample_batch(logits: torch.Tensor, seqs) -> list[int]:
    """The next token of each sequence from its logits row ([batch, vocab], any device)."""
    return sample_tokens(_apply_penalties(logits.float().clone(), seqs), seqs).tolist()


def sample_tokens(logits: torch.Tensor, seqs) -> torch.Tensor:
    """The next token of each sequence from its float logits row, penalties already applied, as a tensor on the
    logits' device: nothing is read back, so the host may queue more work before the tokens exist."""
    tokens = greedy_tokens(logits)
    rows = [i for i, seq in enumerate(seqs) if not seq.params.greedy]
    if rows:
        device = logits.device
        index = list_tensor(rows, torch.long, device)
        probs = sampling_probs(logits.index_select(0, index), [seqs[i].params for i in rows])
        noise = torch.stack([torch.empty(logits.shape[-1], device=device).exponential_(
            generator=seqs[i].generator(device)) for i in rows])
        tokens[index] = (probs / noise.clamp_min_(1e-30)).argmax(-1)
    return tokens


def sampling_probs(logits: torch.Tensor, params: list) -> torch.Tensor:
    """What each float logits row samples from: the softmax of its logits over its params' temperature, within
    their top-k, top-p and min-p."""
    device = logits.device
    temperature = list_tensor([p.temperature for p in params], torch.float32, device)
    top_k = list_tensor([p.top_k for p in params], torch.long, device)
    top_p = list_tensor([p.top_p for p in params], torch.float32, device)
    min_p = list_tensor([p.min_p for p in params], torch.float32, device) if any(p.min_p for p in params) else None
    return filter_logits_batch(logits / temperature[:, None], top_k, top_p, min_p).softmax(-1)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A per-request generator on `device`: seeded requests repeat exactly, whatever else runs beside them."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,))))
    return generator


def token_logprobs(logits: torch.Tensor, token: int, top_n: int) -> tuple[float, list[tuple[int, float]]]:
    """Log-probability of the chosen token under the model's distribution, and the top_n alternatives."""
    logprobs = logits.float().log_softmax(-1)
    top = torch.topk(logprobs, top_n) if top_n else None
    alternatives = [] if top is None else list(zip(top.indices.tolist(), top.values.tolist()))
    return float(logprobs[token]), alternatives
