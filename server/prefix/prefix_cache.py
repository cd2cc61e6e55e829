"""A radix tree of KV-cache states keyed by token ids, held under a byte budget.

Every stored state covers exactly the tokens on the path from the root to its node. A
prompt starts from the longest prefix some state can give it:

- a state stored on the prompt's own path (at most `limit` tokens deep) is used as it is;
- a *trimmable* state stored anywhere below the point where the prompt leaves the tree
  also shares that prompt's first `matched` tokens, so it can be cut back to them (a
  KVCache only has to forget its last positions). States of recurrent layers (the linear
  attention of hybrid models) cannot be cut back, so only the first kind is used for them.

This module knows nothing of MLX: a state is opaque, the caller says how many bytes it
holds and whether it is trimmable. Eviction is least-recently-used within two priorities:
turn states go first, the shared first segment of a prompt (system prompt and tools) last.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


class Priority(enum.IntEnum):
    TURN = 0  # ends of turns, prompts and generations: evicted first
    SHARED = 1  # the first segment many conversations start with: kept longest


class _Node:
    __slots__ = ("edge", "parent", "depth", "children", "entry", "trimmable_below")

    def __init__(self, edge: tuple[int, ...], parent: _Node | None, depth: int):
        self.edge = edge  # the tokens between the parent and this node
        self.parent = parent
        self.depth = depth  # tokens from the root to the end of `edge`
        self.children: dict[int, _Node] = {}
        self.entry: Entry | None = None
        self.trimmable_below = 0  # trimmable states at this node or under it


@dataclass(eq=False)
class Entry:
    state: Any
    nbytes: int
    trimmable: bool
    priority: Priority
    node: _Node

    @property
    def depth(self) -> int:
        return self.node.depth

    def tokens(self) -> tuple[int, ...]:
        """The tokens this state covers (the path from the root)."""
        edges, node = [], self.node
        while node is not None:
            edges.append(node.edge)
            node = node.parent
        return tuple(token for edge in reversed(edges) for token in edge)


@dataclass(frozen=True)
class Match:
    """`entry`'s state gives the prompt's first `length` tokens (trim it if it is deeper)."""

    length: int
    entry: Entry

    @property
    def trim(self) -> int:
        return self.entry.depth - self.length


def _common_length(edge: tuple[int, ...], tokens: Sequence[int], start: int) -> int:
    """How many of `edge`'s tokens `tokens[start:]` begins with."""
    if tuple(tokens[start:start + len(edge)]) == edge:
        return len(edge)
    n = 0
    for a, b in zip(edge, tokens[start:], strict=False):
        if a != b:
            break
        n += 1
    return n


class PrefixCache:
    def __init__(self, budget_bytes: int, on_evict: Callable[[Entry], None] | None = None,
                 on_drop: Callable[[Entry], None] | None = None):
        self.budget_bytes = budget_bytes
        self.bytes_held = 0
        self.evictions = 0
        self._root = _Node((), None, 0)
        # Least recently used first, one order per priority.
        self._lru: dict[Priority, OrderedDict[Entry, None]] = {p: OrderedDict() for p in Priority}
        self._on_evict = on_evict  # an entry evicted for room
        self._on_drop = on_drop  # an entry dropped as redundant (a deeper one covers it)

    def __len__(self) -> int:
        return sum(len(order) for order in self._lru.values())

    def holds(self, entry: Entry) -> bool:
        """Whether `entry` is still stored (not evicted or replaced)."""
        return entry in self._lru[entry.priority]

    def entries(self) -> list[Entry]:
        return [e for order in self._lru.values() for e in order]

    # ------------------------------------------------------------ lookup

    def lookup(self, tokens: Sequence[int], limit: int, touch: bool = True) -> Match | None:
        """The longest reusable prefix of `tokens`, at most `limit` tokens; marks it used
        unless `touch` is False (a look that does not use it)."""
        node, i = self._root, 0
        best: Match | None = None
        # (node, n): every state at or under `node` shares the prompt's first n tokens.
        path = [(self._root, 0)]
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                break
            k = _common_length(child.edge, tokens, i)
            path.append((child, i + k))
            if k < len(child.edge):  # the prompt leaves the tree inside this edge
                break
            node, i = child, i + k
            if node.entry is not None and node.depth <= limit:
                best = Match(node.depth, node.entry)
        for node, shared in reversed(path):  # deepest first: the first trimmable one wins
            usable = min(shared, limit)
            if usable <= (best.length if best else 0):
                break
            if node.trimmable_below:
                best = Match(usable, self._trimmable_under(node))
                break
        if best is not None and touch:
            # Using a prefix uses the shorter states on its path too (the shared segment
            # above a conversation's turns); the one used goes last, as the most recent.
            for node, _ in path:
                if node.entry is not None and node.depth <= best.length:
                    self._touch(node.entry)
            self._touch(best.entry)
        return best

    @staticmethod
    def _trimmable_under(node: _Node) -> Entry:
        """The shallowest trimmable state at or under `node` along one branch."""
        while node.entry is None or not node.entry.trimmable:
            node = next(c for c in node.children.values() if c.trimmable_below)
        return node.entry

    # ------------------------------------------------------------ store

    def wants(self, tokens: Sequence[int], nbytes: int, trimmable: bool,
              priority: Priority) -> bool:
        """False when storing would add nothing: the budget cannot hold it, the same tokens
        are stored already, or a deeper trimmable state of at least this priority covers
        them. Marks the state that already covers them as used."""
        if not tokens or nbytes > self.budget_bytes:
            return False
        node, exact = self._find(tokens)
        if node is None:
            return True
        if exact and node.entry is not None:
            node.entry.priority = max(node.entry.priority, priority)
            self._touch(node.entry)
            return False
        if trimmable and node.trimmable_below:
            covering = self._trimmable_under(node)
            if covering.priority >= priority:
                self._touch(covering)
                return False
        return True

    def store(self, tokens: Sequence[int], state: Any, nbytes: int, trimmable: bool,
              priority: Priority = Priority.TURN) -> Entry | None:
        """Stores `state` for `tokens` unless `wants` says it adds nothing (then None).
        Evicts what the budget cannot hold before adding it: the budget holds throughout."""
        if not self.wants(tokens, nbytes, trimmable, priority):
            return None
        tokens = tuple(tokens)
        if trimmable:
            self._drop_covered_ancestors(tokens, priority)
        while self.bytes_held + nbytes > self.budget_bytes:
            self._evict_one()
        node = self._insert_path(tokens)
        entry = Entry(state, nbytes, trimmable, priority, node)
        node.entry = entry
        if trimmable:
            self._count_trimmable(node, +1)
        self._lru[priority][entry] = None
        self.bytes_held += nbytes
        return entry

    @staticmethod
    def _count_trimmable(node: _Node | None, change: int) -> None:
        while node is not None:
            node.trimmable_below += change
            node = node.parent

    def _drop_covered_ancestors(self, tokens: tuple[int, ...], priority: Priority) -> None:
        """A trimmable state makes trimmable states of its prefixes redundant (they are
        one trim away), unless they rank higher: the shared segment outlives turns."""
        node, i = self._root, 0
        redundant = []
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None or _common_length(child.edge, tokens, i) < len(child.edge):
                break
            node, i = child, i + len(child.edge)
            entry = node.entry
            if entry is not None and entry.trimmable and entry.priority <= priority:
                redundant.append(entry)
        for entry in redundant:
            self._remove(entry)
            if self._on_drop is not None:
                self._on_drop(entry)

    def set_budget(self, budget_bytes: int) -> None:
        """A new budget; evicts (least valuable first) down to it."""
        self.budget_bytes = budget_bytes
        while self.bytes_held > budget_bytes:
            self._evict_one()

    def discard(self, entry: Entry) -> None:
        if self.holds(entry):
            self._remove(entry)

    def clear(self) -> None:
        for entry in self.entries():
            self._remove(entry)

    # ------------------------------------------------------------ eviction

    def _evict_one(self) -> None:
        for priority in Priority:
            order = self._lru[priority]
            if order:
                victim = next(iter(order))
                self._remove(victim)
                self.evictions += 1
                if self._on_evict is not None:
                    self._on_evict(victim)
                return
        raise AssertionError("bytes are counted but no entry holds them")

    def _remove(self, entry: Entry) -> None:
        del self._lru[entry.priority][entry]
        self.bytes_held -= entry.nbytes
        node = entry.node
        node.entry = None
        if entry.trimmable:
            self._count_trimmable(node, -1)
        # Drop nodes that lead nowhere, then merge a node left with a single child.
        while node.parent is not None and node.entry is None and not node.children:
            del node.parent.children[node.edge[0]]
            node = node.parent
        if node.parent is not None and node.entry is None and len(node.children) == 1:
            (child,) = node.children.values()
            child.edge = node.edge + child.edge
            child.parent = node.parent
            node.parent.children[child.edge[0]] = child

    def _touch(self, entry: Entry) -> None:
        order = self._lru[entry.priority]
        if entry in order:
            order.move_to_end(entry)
        else:  # its priority was raised
            for other in self._lru.values():
                other.pop(entry, None)
            order[entry] = None

    # ------------------------------------------------------------ tree

    def _find(self, tokens: Sequence[int]) -> tuple[_Node | None, bool]:
        """(node, True) for the node ending exactly at `tokens`; (child, False) when `tokens`
        ends inside the edge to `child` (its whole subtree shares them); (None, False) when
        no stored path holds them all."""
        node, i = self._root, 0
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                return None, False
            k = _common_length(child.edge, tokens, i)
            if i + k == len(tokens):
                return child, k == len(child.edge)
            if k < len(child.edge):
                return None, False
            node, i = child, i + k
        return node, True

    def _insert_path(self, tokens: tuple[int, ...]) -> _Node:
        node, i = self._root, 0
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                leaf = _Node(tokens[i:], node, len(tokens))
                node.children[tokens[i]] = leaf
                return leaf
            k = _common_length(child.edge, tokens, i)
            if k < len(child.edge):
                child = self._split(child, k)
            node, i = child, i + k
        return node

    @staticmethod
    def _split(child: _Node, k: int) -> _Node:
        """Puts a new node `k` tokens into `child`'s edge and returns it."""
        parent = child.parent
        assert parent is not None
        middle = _Node(child.edge[:k], parent, parent.depth + k)
        middle.trimmable_below = child.trimmable_below
        parent.children[middle.edge[0]] = middle
        child.edge = child.edge[k:]
        child.parent = middle
        middle.children[child.edge[0]] = child
        return middle
