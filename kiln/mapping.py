"""Mapping (which slice of the model a rank owns) and the shard rules.

Ranks are laid out tensor-parallel first: rank = pp_rank * tp_size + tp_rank, so the tp_size
ranks of one pipeline stage are neighbours (one node, fast links). Every shard rule here is a
pure function of (full tensor, mapping): convert, quantize and build share them.

Mixture-of-experts layers may split the TP group differently (TensorRT-LLM's moe_tp_size x moe_ep_size =
tp_size): the experts are dealt out to moe_ep_size groups of moe_tp_size neighbouring ranks (tp rank r holds the
experts of group r // moe_tp_size), and inside a group each expert's intermediate dim is split moe_tp_size ways.
Either way every rank's expert output is a partial sum, so the MoE layer keeps its one all-reduce over the TP group.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

from kiln.errors import ConfigError


@dataclass(frozen=True)
class Mapping:
    world_size: int = 1
    tp_size: int = 1
    pp_size: int = 1
    rank: int = 0
    moe_tp_size: int | None = None  # None: tp_size // moe_ep_size
    moe_ep_size: int | None = None  # None: tp_size // moe_tp_size (1 when both are None)

    def __post_init__(self):
        for name in ("world_size", "tp_size", "pp_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"Mapping.{name} must be an integer >= 1, got {value!r}")
        self._resolve_moe_sizes()
        if self.world_size != self.tp_size * self.pp_size:
            raise ConfigError(
                f"Mapping.world_size ({self.world_size}) must equal tp_size * pp_size "
                f"({self.tp_size} * {self.pp_size} = {self.tp_size * self.pp_size})"
            )
        if not isinstance(self.rank, int) or not 0 <= self.rank < self.world_size:
            raise ConfigError(f"Mapping.rank must be in [0, {self.world_size - 1}], got {self.rank!r}")

    def _resolve_moe_sizes(self) -> None:
        """Fill in whichever of moe_tp_size / moe_ep_size is None, then check their product is tp_size."""
        for name in ("moe_tp_size", "moe_ep_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"Mapping.{name} must be an integer >= 1, got {value!r}")
        tp, ep = self.moe_tp_size, self.moe_ep_size
        if tp is None and ep is None:
            tp, ep = self.tp_size, 1
        elif tp is None:
            if self.tp_size % ep:
                raise ConfigError(f"Mapping.moe_ep_size ({ep}) must divide tp_size ({self.tp_size})")
            tp = self.tp_size // ep
        elif ep is None:
            if self.tp_size % tp:
                raise ConfigError(f"Mapping.moe_tp_size ({tp}) must divide tp_size ({self.tp_size})")
            ep = self.tp_size // tp
        if tp * ep != self.tp_size:
            raise ConfigError(f"Mapping.moe_tp_size * moe_ep_size ({tp} * {ep} = {tp * ep}) must equal tp_size "
                              f"({self.tp_size})")
        object.__setattr__(self, "moe_tp_size", tp)  # frozen: resolved once, here
        object.__setattr__(self, "moe_ep_size", ep)

    @classmethod
    def of(cls, tp_size: int = 1, pp_size: int = 1, rank: int = 0, moe_tp_size: int | None = None,
           moe_ep_size: int | None = None) -> "Mapping":
        return cls(world_size=tp_size * pp_size, tp_size=tp_size, pp_size=pp_size, rank=rank,
                   moe_tp_size=moe_tp_size, moe_ep_size=moe_ep_size)

    def with_rank(self, rank: int) -> "Mapping":
        return replace(self, rank=rank)

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp_size

    @property
    def moe_tp_rank(self) -> int:
        """Which slice of each local expert's intermediate dim this rank holds."""
        return self.tp_rank % self.moe_tp_size

    @property
    def moe_ep_rank(self) -> int:
        """Which group of experts this rank holds."""
        return self.tp_rank // self.moe_tp_size

    def local_experts(self, num_experts: int) -> range:
        """Global indices of the experts this rank holds."""
        if num_experts % self.moe_ep_size:
            raise ConfigError(f"Mapping.moe_ep_size ({self.moe_ep_size}) must divide the number of experts "
                              f"({num_experts})")
        per_rank = num_experts // self.moe_ep_size
        return range(self.moe_ep_rank * per_rank, (self.moe_ep_rank + 1) * per_rank)

    @property
    def is_first_pp_rank(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_pp_rank(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def pp_layers(self, num_layers: int) -> range:
        """Global indices of the decoder layers this rank's stage runs (earlier stages take the remainder)."""
        if num_layers < self.pp_size:
            raise ConfigError(f"Mapping.pp_size ({self.pp_size}) cannot exceed the number of layers ({num_layers})")
        base, extra = divmod(num_layers, self.pp_size)
        start = self.pp_rank * base + min(self.pp_rank, extra)
        return range(start, start + base + (1 if self.pp_rank < extra else 0))

    def to_dict(self) -> dict:
        """The mapping as stored in a checkpoint: the layout, not which rank reads it. The moe sizes are
        written only when experts are split otherwise than the default (all tensor-parallel), so dense and
        default configs read as before."""
        d = asdict(self)
        d.pop("rank")
        if (self.moe_tp_size, self.moe_ep_size) == (self.tp_size, 1):
            del d["moe_tp_size"], d["moe_ep_size"]
        return d

    @classmethod
    def from_dict(cls, d: dict, rank: int = 0) -> "Mapping":
        """Checkpoints written before expert parallelism lack the moe fields: they default as in the constructor."""
        fields, optional = ("world_size", "tp_size", "pp_size"), ("moe_tp_size", "moe_ep_size")
        unknown = sorted(set(d) - set(fields) - set(optional))
        missing = [f for f in fields if f not in d]
        if unknown or missing:
            raise ConfigError(f"mapping: unknown field(s) {unknown}, missing field(s) {missing}; "
                              f"expected {list(fields)} and optionally {list(optional)}")
        return cls(world_size=d["world_size"], tp_size=d["tp_size"], pp_size=d["pp_size"], rank=rank,
                   moe_tp_size=d.get("moe_tp_size"), moe_ep_size=d.get("moe_ep_size"))


# ---- shard rules: (full tensor, mapping) -> this rank's slice --------------------------------------

def _split(tensor: torch.Tensor, dim: int, parts: int, index: int, what: str, by: str = "tp_size") -> torch.Tensor:
    size = tensor.shape[dim]
    if size % parts:
        raise ConfigError(f"cannot split {what} of size {size} (dim {dim}) into {by}={parts} equal parts; "
                          f"choose a {by} that divides {size}")
    chunk = size // parts
    return tensor.narrow(dim, index * chunk, chunk).contiguous()


def replicate(tensor: torch.Tensor, mapping: Mapping) -> torch.Tensor:
    return tensor


def shard_column(tensor: torch.Tensor, mapping: Mapping) -> torch.Tensor:
    """Column-parallel linear weight or bias: split the output dim (dim 0)."""
    return _split(tensor, 0, mapping.tp_size, mapping.tp_rank, "a column-parallel tensor")


def shard_row(tensor: torch.Tensor, mapping: Mapping) -> torch.Tensor:
    """Row-parallel linear weight: split the input dim; a 1-D bias is kept whole (added after the all-reduce)."""
    if tensor.dim() == 1:
        return tensor
    return _split(tensor, 1, mapping.tp_size, mapping.tp_rank, "a row-parallel weight")


def _local_experts(tensor: torch.Tensor, mapping: Mapping) -> torch.Tensor:
    return _split(tensor, 0, mapping.moe_ep_size, mapping.moe_ep_rank, "the experts", "moe_ep_size")


def shard_expert_column(tensor: torch.Tensor, mapping: Mapping) -> torch.Tensor:
    """Stacked expert weights [experts, out, in]: this rank's experts, then their slice of the output dim."""
    return _split(_local_experts(tensor, mapping), 1, mapping.moe_tp_size, mapping.moe_tp_rank,
                  "a column-parallel expert tensor", "moe_tp_size")


def shard_experts(tensor: torch.Tensor, mapping: Mapping) -> torch.Tensor:
    """Stacked expert tensors kept whole but for the expert dim: a row-parallel expert's per-output scales."""
    return _local_experts(tensor, mapping)


def shard_expert_row_bias(tensor: torch.Tensor, mapping: Mapping) -> torch.Tensor:
    """A row-parallel expert's bias [experts, out]: this rank's experts, whole on moe_tp rank 0 and zeros on the
    others, so the all-reduce of their partial sums adds it once."""
    local = _local_experts(tensor, mapping)
    return local if mapping.moe_tp_rank == 0 else torch.zeros_like(local)


def shard_expert_row(tensor: torch.Tensor, mapping: Mapping) -> torch.Tensor:
    """Stacked expert weights [experts, out, in]: this rank's experts, then their slice of the input dim."""
    return _split(_local_experts(tensor, mapping), 2, mapping.moe_tp_size, mapping.moe_tp_rank,
                  "a row-parallel expert weight", "moe_tp_size")


def padded_vocab_size(vocab_size: int, tp_size: int) -> int:
    return -(-vocab_size // tp_size) * tp_size


def shard_vocab(tensor: torch.Tensor, mapping: Mapping) -> torch.Tensor:
    """Vocab-parallel embedding / lm_head: split dim 0, zero-padding the vocab to a multiple of tp_size."""
    vocab = tensor.shape[0]
    padded = padded_vocab_size(vocab, mapping.tp_size)
    if padded != vocab:
        tensor = torch.cat([tensor, tensor.new_zeros((padded - vocab, *tensor.shape[1:]))])
    return _split(tensor, 0, mapping.tp_size, mapping.tp_rank, "the vocabulary")


def kv_heads_per_rank(num_kv_heads: int, tp_size: int) -> int:
    """KV heads a rank holds: a share of them, or one replicated head when tp_size exceeds them."""
    if num_kv_heads >= tp_size:
        if num_kv_heads % tp_size:
            raise ConfigError(f"num_key_value_heads ({num_kv_heads}) must be divisible by tp_size ({tp_size})")
        return num_kv_heads // tp_size
    if tp_size % num_kv_heads:
        raise ConfigError(f"tp_size ({tp_size}) must be a multiple of num_key_value_heads ({num_kv_heads}) "
                          "when it exceeds them")
    return 1


def shard_qkv(tensor: torch.Tensor, mapping: Mapping, num_heads: int, num_kv_heads: int,
              head_size: int) -> torch.Tensor:
    """Fused [q; k; v] weight or bias: each rank takes its query heads and its (maybe replicated) KV heads."""
    tp, r = mapping.tp_size, mapping.tp_rank
    q, k, v = tensor.split([num_heads * head_size, num_kv_heads * head_size, num_kv_heads * head_size])
    q = _split(q, 0, tp, r, "the query heads")
    k, v = (shard_kv_heads(t, mapping, num_kv_heads, head_size) for t in (k, v))
    return torch.cat([q, k, v]).contiguous()


def shard_kv_heads(tensor: torch.Tensor, mapping: Mapping, num_kv_heads: int, head_size: int) -> torch.Tensor:
    """The rows of this rank's KV heads (dim 0, head_size a head): a share of them, or the one head a rank
    replicates when tp_size exceeds them."""
    tp, r = mapping.tp_size, mapping.tp_rank
    if num_kv_heads >= tp:
        return _split(tensor, 0, tp, r, "the key/value heads")
    kv_per_rank = kv_heads_per_rank(num_kv_heads, tp)  # validates; == 1
    return tensor.narrow(0, r * num_kv_heads // tp * head_size, kv_per_rank * head_size)
