"""The prefix cache's radix tree on its own: lookups, trimming rules, budget and eviction.

States here are plain labels: the tree never looks inside them (kv_state.py does, and
test_prefix_cache_states.py tests that part on real mlx_lm caches).
"""

from __future__ import annotations

import random

import pytest

from swan_serve.server.prefix.prefix_cache import Entry, PrefixCache, Priority
from swan_serve.server.settings import parse_byte_size


def check_invariants(cache: PrefixCache) -> None:
    entries = cache.entries()
    assert cache.bytes_held == sum(e.nbytes for e in entries) <= cache.budget_bytes
    for entry in entries:  # every state is found again under its own tokens
        tokens = entry.tokens()
        assert entry.depth == len(tokens)
        node, exact = cache._find(tokens)
        assert exact and node is entry.node
    assert cache._root.trimmable_below == sum(e.trimmable for e in entries)
    # Radix compaction: no node without a state has fewer than two children.
    stack = list(cache._root.children.values())
    while stack:
        node = stack.pop()
        assert node.entry is not None or len(node.children) >= 2
        assert all(child.parent is node for child in node.children.values())
        assert all(child.depth == node.depth + len(child.edge) for child in node.children.values())
        below = sum(c.trimmable_below for c in node.children.values())
        assert node.trimmable_below == below + bool(node.entry and node.entry.trimmable)
        stack.extend(node.children.values())


def reference_length(entries: list[Entry], prompt: list[int], limit: int) -> int:
    """The longest prefix any stored state can give, by brute force."""
    best = 0
    for entry in entries:
        tokens = list(entry.tokens())
        common = 0
        for a, b in zip(tokens, prompt, strict=False):
            if a != b:
                break
            common += 1
        if common == len(tokens) and len(tokens) <= limit:
            best = max(best, len(tokens))
        elif entry.trimmable:
            best = max(best, min(common, limit))
    return best


def test_empty_cache_has_no_match() -> None:
    cache = PrefixCache(1000)
    assert cache.lookup([1, 2, 3], limit=2) is None
    assert len(cache) == 0


def test_exact_state_on_the_path_is_used_as_it_is() -> None:
    cache = PrefixCache(1000)
    cache.store([1, 2, 3], "abc", 10, trimmable=False)
    match = cache.lookup([1, 2, 3, 4, 5], limit=4)
    assert (match.length, match.trim, match.entry.state) == (3, 0, "abc")
    # The whole prompt stored: the last token must still be computed, and this state
    # cannot be cut back by one.
    assert cache.lookup([1, 2, 3], limit=2) is None


def test_trimmable_state_is_cut_back_to_the_shared_tokens() -> None:
    cache = PrefixCache(1000)
    cache.store([1, 2, 3, 4, 5, 6], "long", 10, trimmable=True)
    match = cache.lookup([1, 2, 3, 9, 9], limit=4)
    assert (match.length, match.trim, match.entry.state) == (3, 3, "long")
    # Same prompt again: everything but the last token.
    match = cache.lookup([1, 2, 3, 4, 5, 6], limit=5)
    assert (match.length, match.trim) == (5, 1)


def test_recurrent_state_is_never_cut_back() -> None:
    cache = PrefixCache(1000)
    cache.store([1, 2], "short", 10, trimmable=False)
    cache.store([1, 2, 3, 4, 5, 6], "long", 10, trimmable=False)
    match = cache.lookup([1, 2, 3, 4, 9], limit=4)
    assert (match.length, match.entry.state) == (2, "short")
    assert cache.lookup([1, 2, 3, 4, 5, 6, 7], limit=6).entry.state == "long"


def test_exact_state_wins_a_tie_with_a_trimmed_one() -> None:
    cache = PrefixCache(1000)
    cache.store([1, 2, 3], "system", 10, trimmable=True, priority=Priority.SHARED)
    cache.store([1, 2, 3, 4, 5], "turn", 10, trimmable=True)
    match = cache.lookup([1, 2, 3, 7, 7], limit=4)
    assert (match.length, match.trim, match.entry.state) == (3, 0, "system")


def test_duplicate_and_covered_states_are_not_stored_again() -> None:
    cache = PrefixCache(1000)
    assert cache.store([1, 2, 3, 4], "a", 10, trimmable=True) is not None
    assert not cache.wants([1, 2, 3, 4], 10, trimmable=True, priority=Priority.TURN)
    # A prefix of a trimmable state is one trim away from it.
    assert cache.store([1, 2], "b", 10, trimmable=True) is None
    # ...unless it is the shared segment, which must outlive the turns below it.
    assert cache.store([1, 2], "c", 10, trimmable=True, priority=Priority.SHARED) is not None
    # Recurrent states are exact: each depth is its own state.
    assert cache.store([1, 2, 3], "d", 10, trimmable=False) is not None
    assert len(cache) == 3
    check_invariants(cache)


def test_longer_trimmable_state_replaces_its_turn_prefixes() -> None:
    cache = PrefixCache(1000)
    cache.store([1, 2], "shared", 10, trimmable=True, priority=Priority.SHARED)
    cache.store([1, 2, 3, 4], "prompt", 10, trimmable=True)
    cache.store([1, 2, 3, 4, 5, 6], "generated", 10, trimmable=True)
    assert sorted(e.state for e in cache.entries()) == ["generated", "shared"]
    assert cache.bytes_held == 20
    check_invariants(cache)


def test_budget_is_never_exceeded_and_lru_goes_first() -> None:
    evicted: list[str] = []
    cache = PrefixCache(30, on_evict=lambda e: evicted.append(e.state))
    cache.store([1, 1], "a", 10, trimmable=True)
    cache.store([2, 2], "b", 10, trimmable=True)
    cache.store([3, 3], "c", 10, trimmable=True)
    cache.lookup([1, 1, 5], limit=2)  # "a" is now the most recently used
    cache.store([4, 4], "d", 10, trimmable=True)
    assert evicted == ["b"]
    assert cache.evictions == 1
    assert cache.bytes_held == 30
    assert cache.store([5, 5], "huge", 31, trimmable=True) is None  # larger than the budget
    assert len(cache) == 3
    check_invariants(cache)


def test_using_a_prefix_uses_the_states_above_it() -> None:
    evicted: list[str] = []
    cache = PrefixCache(40, on_evict=lambda e: evicted.append(e.state))
    cache.store([1, 1], "system A", 10, trimmable=True, priority=Priority.SHARED)
    cache.store([2, 2], "system B", 10, trimmable=True, priority=Priority.SHARED)
    cache.store([1, 1, 3, 3], "turn of A", 10, trimmable=True)
    cache.lookup([1, 1, 3, 4], limit=3)  # served by A's turn, cut back: A was used too
    cache.store([5], "system C", 10, trimmable=True, priority=Priority.SHARED)
    cache.store([6], "system D", 10, trimmable=True, priority=Priority.SHARED)
    cache.store([7], "system E", 10, trimmable=True, priority=Priority.SHARED)
    # Turns go first; then the least recently used shared segment is B, not A.
    assert evicted == ["turn of A", "system B"]


def test_shared_segments_are_evicted_last() -> None:
    evicted: list[str] = []
    cache = PrefixCache(30, on_evict=lambda e: evicted.append(e.state))
    cache.store([9, 1], "system", 10, trimmable=True, priority=Priority.SHARED)
    for i in range(5):  # newer turns push out older turns, never the system prompt
        cache.store([9, 1, 5, i], f"turn{i}", 10, trimmable=True)
    assert evicted == ["turn0", "turn1", "turn2"]
    # Storing a shared segment again raises an existing turn state to it.
    assert cache.store([9, 1, 5, 4], "again", 10, trimmable=True,
                       priority=Priority.SHARED) is None
    cache.store([7, 7], "x", 10, trimmable=True)
    assert evicted[-1] == "turn3"
    assert sorted(e.state for e in cache.entries()) == ["system", "turn4", "x"]


def test_eviction_compacts_the_tree() -> None:
    cache = PrefixCache(20)
    cache.store([1, 2, 3, 4], "a", 10, trimmable=False)
    cache.store([1, 2, 5, 6], "b", 10, trimmable=False)
    cache.store([8], "c", 10, trimmable=False)  # evicts "a"
    check_invariants(cache)
    (only_child,) = [n for n in cache._root.children.values() if n.entry is cache.entries()[0]]
    assert only_child.edge == (1, 2, 5, 6)
    assert cache.lookup([1, 2, 3, 4, 7], limit=4) is None


@pytest.mark.parametrize("seed", range(6))
def test_randomised_workload_keeps_budget_and_finds_the_longest_prefix(seed: int) -> None:
    rng = random.Random(seed)
    budget = rng.randrange(200, 2000)
    cache = PrefixCache(budget)
    heads = [[rng.randrange(4) for _ in range(rng.randrange(1, 6))] for _ in range(3)]
    for step in range(300):
        prompt = rng.choice(heads) + [rng.randrange(4) for _ in range(rng.randrange(0, 12))]
        if not prompt:
            continue
        limit = len(prompt) - 1
        expected = reference_length(cache.entries(), prompt, limit)
        match = cache.lookup(prompt, limit)
        assert (match.length if match else 0) == expected, step
        if match:
            assert match.trim == 0 or match.entry.trimmable
            assert list(match.entry.tokens()[:match.length]) == prompt[:match.length]
        depth = rng.randrange(1, len(prompt) + 1)
        cache.store(prompt[:depth], f"s{step}", rng.randrange(1, 300), rng.random() < 0.6,
                    rng.choice(list(Priority)))
        check_invariants(cache)
    assert cache.evictions > 0


@pytest.mark.parametrize(("text", "expected"), [
    ("0", 0), ("1000000", 1_000_000), ("512MB", 512 * 10**6), ("2GiB", 2 * 2**30),
    ("1.5g", 1_500_000_000), ("64 kib", 64 * 1024),
])
def test_budget_sizes_parse(text: str, expected: int) -> None:
    assert parse_byte_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "-1", "2XB", "GiB"])
def test_bad_budget_sizes_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a size in bytes"):
        parse_byte_size(text)
