"""Explanations answered before, answered again from memory.

An explanation is a function of the model's weights, the method, its resolved options and the
two texts. A request identical to an earlier one in all of them is answered with the earlier
explanation instead of being computed again: an ij request can take a minute, its repeat takes
a dictionary lookup. The key is (model name, model version, weights version, method, options,
text_a, text_b); the cache belongs to one worker's ``Service``, so it never answers for another
model, another version of it, or weights that have changed since.

It holds at most ``max_bytes`` (the explanations' tensors and token strings, estimated), and
evicts the least recently used; 0 turns it off. Identical items of one batch are computed once
(``Service.explain``); a worker computes one batch at a time, so a request identical to one
being computed is either in its batch or answered from the cache after it.

Each answer says whether it came from the cache (``cached``), and the metrics count hits,
misses and evictions per method (``siamese_explanation_cache_total``, from the answers).
"""
from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from dataclasses import replace
from typing import Hashable

from ..attribution import Explanation

ENTRY_OVERHEAD_BYTES = 512  # the key, the dataclass and the dictionary slot, about


def explanation_bytes(explanation: Explanation) -> int:
    """What holding ``explanation`` costs, about: its tensors and its token strings."""
    tensors = (explanation.relevance_a, explanation.relevance_b, explanation.attributions)
    size = sum(t.nbytes for t in tensors if t is not None)
    size += sum(sys.getsizeof(token) for token in (*explanation.tokens_a, *explanation.tokens_b))
    return size + ENTRY_OVERHEAD_BYTES


class ExplanationCache:
    """A byte-bounded LRU of explanations by request key, safe to share between threads."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.held_bytes = 0
        self._entries: OrderedDict[Hashable, tuple[Explanation, int]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> Explanation | None:
        """The explanation stored under ``key`` (now the most recently used), or None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: Hashable, explanation: Explanation) -> int:
        """Store ``explanation`` under ``key``; returns how many entries were evicted for it.
        One larger than the whole cache is not stored."""
        size = explanation_bytes(explanation)
        if size > self.max_bytes:
            return 0
        evicted = 0
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.held_bytes -= old[1]
            while self.held_bytes + size > self.max_bytes:
                _, (_, freed) = self._entries.popitem(last=False)
                self.held_bytes -= freed
                evicted += 1
            self._entries[key] = (replace(explanation, extras=dict(explanation.extras)), size)
            self.held_bytes += size
        return evicted
