"""The prefix cache's bookkeeping (scoring/prefix_cache.py), plain CPU: which slots hold the tokens of which stored
sequences, and which tokens to give up when a call brings more than there is room for.

A radix tree of token runs: a node holds a run of tokens and the slot of each; a stored sequence is the path from
the root to a node that ends it, so a prefix that several sequences share is held once. A call's sequences go into
the tree first, their new tokens with placeholder slots (`insert`); then `settle` gives up leaves (a node goes only
once nothing below it is held) until the new tokens left fit in the free slots, and hands those out. Leaves go in
this order, the call's new ones among them (giving up a new one means not storing it):

1. spare leaves: used by one sequence and branching off a prefix that several used (a GRPO group's responses; a
   search's candidates that were not extended), least recently used first;
2. every other leaf (a prompt whose responses went, a sequence alone so far: maybe a group's first member, a
   sequence sent again), least recently used first.

So a GRPO group's prompt outlives its responses and the responses of the forwards after it, and its late members
still find it; a ring (everything given up in the order written) let a prompt go with its group's first responses.
(A prompt that no member will ask for again stays until no spare leaf is left: traffic whose next requests extend
spare leaves, a multi-turn rollout's responses, would lose them first.) The nodes
that a call reads are not given up for it (`lock`). Every rank of a replica makes the same calls in the same order
and so takes the same decisions: nothing here depends on hashing or on object ids.
"""

import heapq
from typing import Dict, List, Optional, Tuple

import numpy as np

from .trie import common_prefix

EMPTY = np.zeros(0, dtype=np.int64)


class Node:
    __slots__ = ("ids", "slots", "parent", "children", "last", "uses", "serial", "ends", "locked", "gone")

    def __init__(self, ids: np.ndarray, slots: np.ndarray, parent: Optional["Node"], serial: int, last: int = 0,
                 uses: int = 0):
        self.ids = ids
        self.slots = slots  # one per token; negative: a placeholder until `settle`
        self.parent = parent
        self.children: Dict[int, "Node"] = {}  # first token -> child
        self.last = last  # the tree's clock when a sequence last went through it
        self.uses = uses  # sequences stored through it (each insert counts)
        self.serial = serial  # creation order: ties in eviction
        self.ends = False  # a stored sequence ends here
        self.locked = -1  # the clock of the call that reads it: kept while that call is planned
        self.gone = False  # given up


class RadixTree:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self.clear()

    def clear(self) -> None:
        self.root = Node(EMPTY, EMPTY, None, 0)
        self.free: List[int] = list(range(self.capacity - 1, -1, -1))  # popped from the end: slot 0 first
        self.clock = self.serial = 0
        self.sequences = 0  # stored sequences
        self.written = 0  # slots handed out, all calls so far
        self.pending: List[Node] = []  # nodes with placeholder slots (this call's new tokens)

    def __len__(self) -> int:
        return self.sequences

    # ------------------------------------------------------------ lookups
    def match(self, seq: np.ndarray) -> Tuple[int, List[Node]]:
        """The longest prefix of `seq` the tree holds (tokens) and the nodes it runs through (the last one
        possibly in part)."""
        node, at, path = self.root, 0, []
        while at < len(seq):
            child = node.children.get(int(seq[at]))
            if child is None:
                break
            k = common_prefix(seq[at:], child.ids)
            path.append(child)
            at += k
            if k < len(child.ids):
                break
            node = child
        return at, path

    @staticmethod
    def slots_of(path: List[Node], length: int) -> np.ndarray:
        return np.concatenate([n.slots for n in path])[:length] if path else EMPTY

    def tick(self) -> None:
        """A new call: what it stores or reads is more recent than everything before."""
        self.clock += 1

    def lock(self, path: List[Node]) -> None:
        """The call being planned reads these nodes: `settle` keeps them."""
        for n in path:
            n.locked = self.clock

    # ------------------------------------------------------------ storing
    def insert(self, seq: np.ndarray, slots: np.ndarray) -> bool:
        """Store `seq` with `slots`: for the tokens the tree holds, the tree's; for the call's new tokens,
        placeholders (negative, one per token of the call's trie). Where the tree holds a token of it in another
        slot (the call computed it again: two rows of one call), it stops there: the sequence is not held (False)
        and the tree keeps its own copy."""
        node, at = self.root, 0
        while at < len(seq):
            child = node.children.get(int(seq[at]))
            if child is None:
                node = self._new(seq[at:].copy(), slots[at:].copy(), node)
                break
            k = common_prefix(seq[at:], child.ids)
            if common_prefix(slots[at:at + k], child.slots[:k]) < k:  # computed again
                child.last = self.clock
                return False
            if k < len(child.ids):
                child = self._split(child, k)
            child.last = self.clock
            child.uses += 1
            node, at = child, at + k
        if node is not self.root and not node.ends:
            node.ends = True
            self.sequences += 1
        return node is not self.root

    def _new(self, ids: np.ndarray, slots: np.ndarray, parent: Node) -> Node:
        self.serial += 1
        node = Node(ids, slots, parent, self.serial, self.clock, 1)
        parent.children[int(ids[0])] = node
        self.pending.append(node)
        return node

    def _split(self, node: Node, k: int) -> Node:
        """Cut `node` after its first k tokens; returns the new upper part."""
        parent = node.parent
        upper = Node(node.ids[:k], node.slots[:k], parent, node.serial, node.last, node.uses)
        upper.locked = node.locked
        self.serial += 1
        node.serial = self.serial
        parent.children[int(upper.ids[0])] = upper
        node.ids, node.slots, node.parent = node.ids[k:], node.slots[k:], upper
        upper.children[int(node.ids[0])] = node
        if upper.slots[0] < 0:
            self.pending.append(upper)
        return upper

    # ------------------------------------------------------------ room
    def _spare(self, node: Node) -> bool:
        return node.uses == 1 and node.parent is not self.root and node.parent.uses > 1

    def settle(self) -> Tuple[np.ndarray, np.ndarray]:
        """Give up leaves (module docstring) until this call's new tokens still held fit in the free slots, then
        hand slots out to them. Returns (placeholders, slots) of the new tokens stored."""
        pending = sum(len(n.ids) for n in self.pending)
        if pending > len(self.free):
            self._give_up(pending)
        kept = [n for n in self.pending if not n.gone]
        self.pending = []
        if not kept:
            return EMPTY, EMPTY
        placeholders = np.concatenate([n.slots for n in kept])
        slots = np.array(self.free[len(self.free) - len(placeholders):][::-1], dtype=np.int64)
        del self.free[len(self.free) - len(placeholders):]
        self.written += len(slots)
        at = 0
        for n in kept:
            n.slots = slots[at:at + len(n.ids)]
            at += len(n.ids)
        return placeholders, slots

    def _give_up(self, pending: int) -> None:
        spare: list = []
        rest: list = []
        stack = [self.root]
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            elif node is not self.root and node.locked != self.clock:
                (spare if self._spare(node) else rest).append((node.last, node.serial, node))
        heapq.heapify(spare)
        heapq.heapify(rest)
        while pending > len(self.free) and (spare or rest):
            node = heapq.heappop(spare if spare else rest)[2]
            pending -= self._drop(node)
            parent = node.parent
            if parent is not self.root and not parent.children and parent.locked != self.clock:
                heapq.heappush(spare if self._spare(parent) else rest, (parent.last, parent.serial, parent))

    def _drop(self, node: Node) -> int:
        """Forget a leaf; returns how many of this call's new tokens went with it."""
        node.gone = True
        del node.parent.children[int(node.ids[0])]
        if node.ends:
            self.sequences -= 1
        if node.slots[0] < 0:
            return len(node.ids)
        self.free.extend(node.slots.tolist())
        return 0
