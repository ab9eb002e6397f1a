"""BlockManager, pure Python, on thousands of seeded random operations against an independent model.

The model keeps what the manager must guarantee in its own terms: which token prefixes are findable (by
the prefix itself, not by hash), which blocks each live sequence holds, the order unreferenced cached blocks
were released in, and a shadow KV cache holding the token each slot was last written with. After every
operation the manager's refcounts, free/evictable/referenced sets, prefix hits and LRU order must agree.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest

from kiln.runtime.block_manager import BlockManager


class Model:
    """The reference: what a correct manager holds, derived from the operations and its observed block choices."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool):
        self.num_blocks, self.bs, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.findable: dict[tuple, int] = {}  # a full-block token prefix -> the block holding its last block
        self.content: dict[int, tuple] = {}  # block -> the prefix it is findable by
        self.lru: list[int] = []  # unreferenced findable blocks, least recently released first
        self.tables: dict[int, list[int]] = {}
        self.tokens: dict[int, list[int]] = {}
        self.computed: dict[int, int] = {}
        self.registered: dict[int, int] = {}  # seq -> full blocks already offered for registration
        self.shadow: dict[int, int] = {}  # flat slot -> token written there
        self.queried = self.hits = 0

    def referenced(self) -> Counter:
        return Counter(b for table in self.tables.values() for b in table)

    def available(self) -> int:
        return self.num_blocks - len(self.referenced())

    def expected_hit(self, tokens: list[int]) -> int:
        """Leading full blocks of tokens that are findable, never the block holding the last token."""
        if not self.prefix_caching:
            return 0
        k = 0
        while (k + 1) * self.bs <= len(tokens) - 1 and tuple(tokens[:(k + 1) * self.bs]) in self.findable:
            k += 1
        return k * self.bs

    def take_new(self, block: int, held_before: Counter) -> None:
        """The manager handed out `block` as a fresh one: it must be unreferenced; a never-cached block if
        any is left, else the least recently released cached one, which stops being findable."""
        assert block not in held_before, "a block a live sequence holds was handed out again"
        never_cached = [b for b in range(self.num_blocks) if b not in held_before and b not in self.content]
        if never_cached:
            assert block in never_cached, "a cached block was evicted while a free one was left"
        else:
            assert self.lru and block == self.lru[0], "eviction is not least recently released first"
        if block in self.content:
            del self.findable[self.content.pop(block)]
            self.lru.remove(block)


def _check_manager(bm: BlockManager, model: Model) -> None:
    refs = model.referenced()
    assert all(len(set(t)) == len(t) for t in bm.tables.values()), "a table holds a block twice"
    assert bm.tables == model.tables
    assert bm.refs == [refs[b] for b in range(bm.num_blocks)], "refcount != number of live tables holding it"
    free, evictable = list(bm.free_blocks), list(bm.evictable)
    held = {b for b in range(bm.num_blocks) if bm.refs[b] > 0}
    assert len(set(free)) == len(free)
    assert not (set(free) & set(evictable)) and not (set(free) & held) and not (set(evictable) & held)
    assert set(free) | set(evictable) | held == set(range(bm.num_blocks)), "a block was lost"
    assert bm.num_available() == len(free) + len(evictable) == model.available()
    assert evictable == model.lru, "LRU order"
    assert not any(b in bm.hash_of for b in free) and all(b in bm.hash_of for b in evictable)
    assert {b: h for h, b in bm.block_of.items()} == bm.hash_of
    assert set(bm.hash_of) == set(model.content)
    # A block in two live tables is a shared cached prefix: same place, same tokens up to its end.
    where: dict[int, list[tuple[int, int]]] = {}
    for seq, table in bm.tables.items():
        for i, b in enumerate(table):
            where.setdefault(b, []).append((seq, i))
    for b, places in where.items():
        if len(places) > 1:
            assert b in model.content, "a live block was handed to another sequence"
            prefix = model.content[b]
            for seq, i in places:
                assert (i + 1) * model.bs == len(prefix) and tuple(model.tokens[seq][:len(prefix)]) == prefix
    assert bm.hit_rate() == (model.hits / model.queried if model.queried else 0.0)


def _allocate(bm: BlockManager, model: Model, rng: random.Random, seq: int) -> None:
    donors = list(model.tokens.values()) + [list(p) for p in model.findable]
    prompt = []
    if donors and rng.random() < 0.8:  # share a random prefix of an earlier sequence
        donor = rng.choice(donors)
        prompt = donor[:rng.randint(0, len(donor))]
    prompt += [rng.randint(0, 3) for _ in range(rng.choice([0, 1, 3, rng.randint(1, 3 * model.bs)]))]
    if not prompt:
        prompt = [rng.randint(0, 3)]
    if not bm.can_allocate(len(prompt)):
        assert -(-len(prompt) // model.bs) > model.available()
        return
    expected = model.expected_hit(prompt)
    held_before = model.referenced()
    cached = bm.allocate(seq, prompt)
    assert cached == expected, (cached, expected)
    assert cached % model.bs == 0 and cached < len(prompt)
    table = bm.tables[seq]
    assert len(table) == -(-len(prompt) // model.bs)
    for i, b in enumerate(table):
        if i < cached // model.bs:
            assert model.findable[tuple(prompt[:(i + 1) * model.bs])] == b
            if b in model.lru:
                model.lru.remove(b)
            # The reused block really holds this prefix's tokens.
            held = [model.shadow.get(b * model.bs + j) for j in range(model.bs)]
            assert held == prompt[i * model.bs:(i + 1) * model.bs]
        else:
            model.take_new(b, held_before)
            held_before[b] += 1
    model.tables[seq], model.tokens[seq], model.computed[seq] = list(table), list(prompt), cached
    model.registered[seq] = cached // model.bs
    model.queried += len(prompt)
    model.hits += cached


def _grow(bm: BlockManager, model: Model, rng: random.Random, seq: int) -> None:
    new = [rng.randint(0, 3) for _ in range(rng.choice([1, 1, 2, model.bs + 1]))]
    tokens = model.tokens[seq] + new
    need = -(-len(tokens) // model.bs) - len(model.tables[seq])
    held_before = model.referenced()
    ok = bm.append_slots(seq, len(tokens))
    assert ok == (need <= model.available())
    if not ok:
        return  # the table is unchanged: checked against the model next
    for b in bm.tables[seq][len(model.tables[seq]):]:
        model.take_new(b, held_before)
        held_before[b] += 1
    model.tables[seq] = list(bm.tables[seq])
    model.tokens[seq] = tokens


def _compute(bm: BlockManager, model: Model, rng: random.Random, seq: int) -> None:
    tokens, table = model.tokens[seq], model.tables[seq]
    done = rng.randint(model.computed[seq], len(tokens))
    for pos in range(model.computed[seq], done):  # the forward writes these tokens' keys and values
        slot = bm.slot(seq, pos)
        assert slot == table[pos // model.bs] * model.bs + pos % model.bs
        assert table[pos // model.bs] not in model.content, "a forward would overwrite a cached block"
        model.shadow[slot] = tokens[pos]
    model.computed[seq] = done
    bm.register_full_blocks(seq, tokens, done)
    if model.prefix_caching:
        for i in range(model.registered[seq], done // model.bs):
            prefix = tuple(tokens[:(i + 1) * model.bs])
            if prefix not in model.findable and table[i] not in model.content:
                model.findable[prefix], model.content[table[i]] = table[i], prefix
        model.registered[seq] = max(model.registered[seq], done // model.bs)


def _free(bm: BlockManager, model: Model, seq: int) -> None:
    bm.free(seq)
    table = model.tables.pop(seq)
    del model.tokens[seq], model.computed[seq], model.registered[seq]
    refs = model.referenced()
    model.lru += [b for b in reversed(table) if b not in refs and b in model.content]  # tail first


def _run_case(case: int) -> None:
    rng = random.Random(case)
    bs = rng.choice([1, 2, 4, 8])
    prefix_caching = rng.random() < 0.85
    bm = BlockManager(rng.randint(1, 24), bs, prefix_caching)
    model = Model(bm.num_blocks, bs, prefix_caching)
    next_seq = 0
    for _ in range(rng.randint(1, 120)):
        live = list(model.tables)
        op = rng.random()
        if not live or op < 0.25:
            _allocate(bm, model, rng, next_seq)
            next_seq += 1
        elif op < 0.5:
            _grow(bm, model, rng, rng.choice(live))
        elif op < 0.8:
            _compute(bm, model, rng, rng.choice(live))
        else:
            _free(bm, model, rng.choice(live))
        _check_manager(bm, model)
    for seq in list(model.tables):
        _free(bm, model, seq)
    _check_manager(bm, model)
    assert bm.num_available() == bm.num_blocks and not any(bm.refs), "a block leaked"


@pytest.mark.parametrize("chunk", range(4))
def test_random_operations_keep_the_block_manager_invariants(chunk):
    for case in range(chunk * 500, (chunk + 1) * 500):
        _run_case(case)


def test_prefix_hit_stops_before_the_block_holding_the_last_prompt_token():
    bm = BlockManager(12, 4)
    a = list(range(8))
    assert bm.allocate(0, a) == 0
    bm.register_full_blocks(0, a, 8)
    assert bm.allocate(1, a) == 4  # both blocks are cached, but the last token's logits must be computed
    assert bm.allocate(2, a + [99]) == 8
    assert bm.allocate(3, [0, 1, 2, 3, 4, 5, 6, 99, 5]) == 4  # shares 7 tokens: one full block
    assert bm.allocate(4, [1, 0, 2, 3, 4, 5, 6, 7, 8]) == 0  # same tokens, another order: chained hashes
    assert bm.hit_rate() == pytest.approx(16 / (8 + 8 + 9 + 9 + 9))


def test_unreferenced_cached_blocks_are_evicted_least_recently_released_first():
    bm = BlockManager(4, 2)
    for seq, p in enumerate([[1, 1], [2, 2], [3, 3]]):  # blocks 0, 1, 2, each cached
        bm.allocate(seq, p)
        bm.register_full_blocks(seq, p, 2)
        assert bm.tables[seq] == [seq]
    for seq in (1, 0, 2):  # released in this order: 1's block is the least recently released
        bm.free(seq)
    assert list(bm.evictable) == [1, 0, 2] and list(bm.free_blocks) == [3]
    assert bm.allocate(3, [7, 7, 7, 7, 7]) == 0
    assert bm.tables[3] == [3, 1, 0]  # the never-cached block first, then evictions in LRU order
    assert list(bm.evictable) == [2]
    bm.free(3)
    assert bm.allocate(4, [3, 3, 5]) == 2  # 2's prefix survived the evictions
    for seq, p in ((5, [1, 1, 5]), (6, [2, 2, 5])):  # 1's and 0's did not
        assert bm.allocate(seq, p) == 0
        bm.free(seq)


def test_without_prefix_caching_nothing_is_reused():
    bm = BlockManager(6, 2, prefix_caching=False)
    p = [1, 2, 3, 4, 5]
    bm.allocate(0, p)
    bm.register_full_blocks(0, p, 5)
    bm.free(0)
    assert bm.allocate(1, p) == 0 and bm.hit_rate() == 0.0
    assert not bm.evictable and bm.num_available() == 3
