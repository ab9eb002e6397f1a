"""Mapping (which slice of the model a rank owns) and the shard rules.

Ranks are laid out tensor-parallel first: rank = pp_rank * tp_size + tp_rank, so the tp_size
ranks of one pipeline stage are neighbours (one node, fast links). Every shard rule here is a
pure function of (full tensor, mapping): convert, quantize and build share them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from kiln.errors import ConfigError


@dataclass(frozen=True)
class Mapping:
    world_size: int = 1
    tp_size: int = 1
    pp_size: int = 1
    rank: int = 0

    def __post_init__(self):
        for name in ("world_size", "tp_size", "pp_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"Mapping.{name} must be an integer >= 1, got {value!r}")
        if self.world_size != self.tp_size * self.pp_size:
            raise ConfigError(
                f"Mapping.world_size ({self.world_size}) must equal tp_size * pp_size "
                f"({self.tp_size} * {self.pp_size} = {self.tp_size * self.pp_size})"
            )
        if not isinstance(self.rank, int) or not 0 <= self.rank < self.world_size:
            raise ConfigError(f"Mapping.rank must be in [0, {self.world_size - 1}], got {self.rank!r}")

    @classmethod
    def of(cls, tp_size: int = 1, pp_size: int = 1, rank: int = 0) -> "Mapping":
        return cls(world_size=tp_size * pp_size, tp_size=tp_size, pp_size=pp_size, rank=rank)

    def with_rank(self, rank: int) -> "Mapping":
        return Mapping(self.world_size, self.tp_size, self.pp_size, rank)

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp_size

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
        """The mapping as stored in a checkpoint: the layout, not which rank reads it."""
        d = asdict(self)
        d.pop("rank")
        return d

    @classmethod
    def from_dict(cls, d: dict, rank: int = 0) -> "Mapping":
        fields = ("world_size", "tp_size", "pp_size")
        unknown, missing = sorted(set(d) - set(fields)), [f for f in fields if f not in d]
        if unknown or missing:
            raise ConfigError(f"mapping: unknown field(s) {unknown}, missing field(s) {missing}; "
                              f"expected {list(fields)}")
        return cls(world_size=d["world_size"], tp_size=d["tp_size"], pp_size=d["pp_size"], rank=rank)


# ---- shard rules: (full tensor, mapping) -> this rank's slice --------------------------------------

def _split(tensor: torch.Tensor, dim: int, parts: int, index: int, what: str) -> torch.Tensor:
    size = tensor.shape[dim]
    if size % parts:
        raise ConfigError(f"cannot split {what} of size {size} (dim {dim}) into tp_size={parts} equal parts; "
                          f"choose a tp_size that divides {size}")
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


def shard_expert_column(tensor: torch.Tensor, mapping: Mapping) -> torch.Tensor:
    """Stacked expert weights [experts, out, in]: every rank holds every expert's slice of the output dim."""
    return _split(tensor, 1, mapping.tp_size, mapping.tp_rank, "a column-parallel expert tensor")


def shard_expert_row(tensor: torch.Tensor, mapping: Mapping) -> torch.Tensor:
    """Stacked expert weights [experts, out, in]: split the input dim."""
    return _split(tensor, 2, mapping.tp_size, mapping.tp_rank, "a row-parallel expert weight")


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
    if num_kv_heads >= tp:
        k, v = (_split(t, 0, tp, r, "the key/value heads") for t in (k, v))
    else:
        kv_per_rank = kv_heads_per_rank(num_kv_heads, tp)  # validates; == 1
        head = r * num_kv_heads // tp
        k, v = (t.narrow(0, head * head_size, kv_per_rank * head_size) for t in (k, v))
    return torch.cat([q, k, v]).contiguous()
