"""BlockManager: which KV-cache blocks each sequence owns, with prefix reuse across requests.

The KV cache is cut into blocks of `block_size` tokens. A sequence's block table lists its blocks in
order; token t lives in block table[t // block_size], slot t % block_size. Full blocks are named by a
hash of their tokens chained with the previous block's hash, so two prompts that share a prefix share
its blocks (reference-counted). A block nobody uses keeps its contents and stays findable until it is
needed for something else, least recently freed first (LRU). Plain Python: no tensors.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque


class NoFreeBlocksError(RuntimeError):
    """Raised when a block is asked for and none is free or evictable (the scheduler prevents this)."""


def chain_hash(previous: bytes | None, tokens: list[int]) -> bytes:
    """A 128-bit digest of a block's tokens and everything before it (a collision would silently reuse
    the wrong keys and values, so not Python's 64-bit hash())."""
    digest = hashlib.blake2b(previous or b"", digest_size=16)
    digest.update(array("q", tokens).tobytes())
    return digest.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.refs = [0] * num_blocks
        self.hash_of: dict[int, bytes] = {}  # block -> hash, for full blocks with reusable contents
        self.block_of: dict[bytes, int] = {}  # hash -> block
        self.evictable: OrderedDict[int, None] = OrderedDict()  # unreferenced blocks with contents, LRU first
        self.tables: dict[int, list[int]] = {}
        self.hashes: dict[int, list[bytes]] = {}  # seq -> hashes of its registered full blocks
        self.prefix_queried_tokens = 0
        self.prefix_hit_tokens = 0

    # ---- capacity ----------------------------------------------------------------------------------

    def num_available(self) -> int:
        return len(self.free_blocks) + len(self.evictable)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_tokens: int, reserved: int = 0) -> bool:
        """Whether a new sequence of num_tokens fits, even with no prefix reused, beside `reserved` blocks
        promised to others."""
        return self.blocks_for(num_tokens) + reserved <= self.num_available()

    def usage(self) -> float:
        """Fraction of blocks referenced by a live sequence."""
        return 1 - self.num_available() / self.num_blocks

    def hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_queried_tokens if self.prefix_queried_tokens else 0.0

    # ---- allocation --------------------------------------------------------------------------------

    def _take(self, block: int) -> int:
        if self.refs[block] == 0:
            self.evictable.pop(block, None)
        self.refs[block] += 1
        return block

    def _new_block(self) -> int:
        if self.free_blocks:
            block = self.free_blocks.popleft()
        elif self.evictable:
            block, _ = self.evictable.popitem(last=False)
            del self.block_of[self.hash_of.pop(block)]
        else:
            raise NoFreeBlocksError("no KV-cache block is free")
        self.refs[block] = 1
        return block

    def allocate(self, seq_id: int, tokens: list[int], reuse: bool = True) -> int:
        """Give a new sequence blocks for `tokens`, reusing cached full blocks of its prefix (unless not `reuse`:
        a prompt whose every token's logits are wanted).

        Returns how many leading tokens are already in the cache. The block holding the last token is
        never reused, so at least one token is computed (its logits are needed)."""
        table, hashes, cached, previous = [], [], 0, None
        reusable = (len(tokens) - 1) // self.block_size if self.prefix_caching and reuse else 0
        for i in range(reusable):
            previous = chain_hash(previous, tokens[i * self.block_size:(i + 1) * self.block_size])
            block = self.block_of.get(previous)
            if block is None:
                break
            table.append(self._take(block))
            hashes.append(previous)
            cached += self.block_size
        while len(table) < self.blocks_for(len(tokens)):
            table.append(self._new_block())
        self.tables[seq_id], self.hashes[seq_id] = table, hashes
        self.prefix_queried_tokens += len(tokens)
        self.prefix_hit_tokens += cached
        return cached

    def append_slots(self, seq_id: int, num_tokens: int) -> bool:
        """Grow the table to hold num_tokens tokens; False (and no change) when blocks run out."""
        table = self.tables[seq_id]
        need = self.blocks_for(num_tokens) - len(table)
        if need <= 0:  # the common case (every decode step but one in block_size)
            return True
        if need > self.num_available():
            return False
        for _ in range(need):
            table.append(self._new_block())
        return True

    def register_full_blocks(self, seq_id: int, tokens: list[int], num_computed: int) -> None:
        """Make the blocks that num_computed tokens fill findable by later prompts with the same prefix."""
        if not self.prefix_caching:
            return
        hashes = self.hashes[seq_id]
        full = num_computed // self.block_size
        if full <= len(hashes):  # no block newly full: most calls (a decoding sequence inside a block)
            return
        table, previous = self.tables[seq_id], hashes[-1] if hashes else None
        for i in range(len(hashes), full):
            previous = chain_hash(previous, tokens[i * self.block_size:(i + 1) * self.block_size])
            hashes.append(previous)
            block = table[i]
            if previous not in self.block_of and block not in self.hash_of:
                self.block_of[previous], self.hash_of[block] = block, previous

    def free(self, seq_id: int) -> None:
        """Release a sequence's blocks; cached ones stay findable until reused for something else. The
        last block goes first, so it is evicted first: a prefix's later blocks are useless without its first."""
        for block in reversed(self.tables.pop(seq_id, [])):
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if block in self.hash_of:
                    self.evictable[block] = None
                else:
                    self.free_blocks.append(block)
        self.hashes.pop(seq_id, None)

    def slot(self, seq_id: int, position: int) -> int:
        """Flat cache index of a token: block * block_size + offset."""
        return self.tables[seq_id][position // self.block_size] * self.block_size + position % self.block_size
