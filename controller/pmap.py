"""A persistent (immutable) hash map: setting a key copies O(log32 n) slots, not the map.

A job's per-rank bookkeeping (workers, seqs, the reports of an epoch waiting for the
other ranks) changes on every report; with plain dicts every report of a 4096-rank job
copied 4096 entries. `PMap` is a hash array mapped trie (Bagwell; the structure of
Clojure's maps and CPython's own `contextvars`) of 32-way nodes: `set` and `delete`
copy one node per level (3 levels at 4096 keys) and share the rest with the old map.
Up to `SMALL` keys it is a plain dict copied on change, which is faster at that size.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Generic, TypeVar

__all__ = ["PMap"]

K = TypeVar("K")
V = TypeVar("V")

_BITS = 5
_WIDTH = 1 << _BITS
_MASK = _WIDTH - 1
_MAX_SHIFT = 64  # past the hash's bits, keys that collide share a bucket
#: Up to this many keys a map is a dict, copied on every change: below about 500 keys a
#: C-level dict copy is faster than a path copy in Python (bench/report_cost.py).
SMALL = 512
_EMPTY: tuple[Any, ...] = (None,) * _WIDTH


class _Bucket:
    """Keys whose hashes are equal in every bit (a collision), as a small dict."""

    __slots__ = ("items",)

    def __init__(self, items: dict[Any, Any]) -> None:
        self.items = items


class _Leaf:
    __slots__ = ("h", "key", "value")

    def __init__(self, h: int, key: Any, value: Any) -> None:
        self.h, self.key, self.value = h, key, value


def _set(node: tuple[Any, ...], shift: int, h: int, key: Any, value: Any) -> tuple[Any, bool]:
    """(the node with key set, whether the key is new): a loop down to the slot, then the
    nodes on the way copied back up (the hot path of every report)."""
    path: list[tuple[tuple[Any, ...], int]] = []
    while True:
        i = (h >> shift) & _MASK
        slot = node[i]
        if type(slot) is tuple:
            path.append((node, i))
            node, shift = slot, shift + _BITS
            continue
        if slot is None:
            child: Any = _Leaf(h, key, value)
            added = True
        elif type(slot) is _Leaf:
            if slot.key is key or (slot.h == h and slot.key == key):
                child, added = _Leaf(h, key, value), False
            elif slot.h == h:
                child, added = _Bucket({slot.key: slot.value, key: value}), True
            else:  # two keys in one slot: a node below, holding both
                sub, _ = _set(_EMPTY, shift + _BITS, slot.h, slot.key, slot.value)
                child, added = _set(sub, shift + _BITS, h, key, value)
        else:
            added = key not in slot.items
            child = _Bucket({**slot.items, key: value})
        break
    new = (*node[:i], child, *node[i + 1 :])
    for parent, j in reversed(path):
        new = (*parent[:j], new, *parent[j + 1 :])
    return new, added


def _get(node: tuple[Any, ...], h: int, key: Any, default: Any) -> Any:
    shift = 0
    while True:
        slot = node[(h >> shift) & _MASK]
        if slot is None:
            return default
        if isinstance(slot, _Leaf):
            return slot.value if slot.key is key or (slot.h == h and slot.key == key) else default
        if isinstance(slot, _Bucket):
            return slot.items.get(key, default)
        node, shift = slot, shift + _BITS


def _delete(node: tuple[Any, ...], shift: int, h: int, key: Any) -> tuple[Any, ...] | None:
    """The node without key (None: the key is not there)."""
    i = (h >> shift) & _MASK
    slot = node[i]
    if slot is None:
        return None
    if isinstance(slot, _Leaf):
        if not (slot.key is key or (slot.h == h and slot.key == key)):
            return None
        child: Any = None
    elif isinstance(slot, _Bucket):
        if key not in slot.items:
            return None
        rest = {k: v for k, v in slot.items.items() if k != key}
        child = _Bucket(rest) if len(rest) > 1 else _Leaf(h, *next(iter(rest.items())))
    else:
        sub = _delete(slot, shift + _BITS, h, key)
        if sub is None:
            return None
        child = sub if any(s is not None for s in sub) else None
    copy = list(node)
    copy[i] = child
    return tuple(copy)


def _walk(node: tuple[Any, ...]) -> Iterator[tuple[Any, Any]]:
    for slot in node:
        if slot is None:
            continue
        if isinstance(slot, _Leaf):
            yield slot.key, slot.value
        elif isinstance(slot, _Bucket):
            yield from slot.items.items()
        else:
            yield from _walk(slot)


class PMap(Mapping[K, V], Generic[K, V]):
    """An immutable mapping whose `set` / `delete` return a new map sharing most of this one.

    Args:
        items: the initial (key, value) pairs or mapping.

    Example:
        >>> m = PMap({"a": 1}).set("b", 2)
        >>> dict(m), len(m)
        ({'a': 1, 'b': 2}, 2)
    """

    __slots__ = ("_len", "_root", "_small")

    def __init__(self, items: Mapping[K, V] | Iterable[tuple[K, V]] = ()) -> None:
        small = dict(items)
        self._small: dict[K, V] | None = small
        self._root: tuple[Any, ...] = _EMPTY
        self._len = len(small)
        if len(small) > SMALL:
            self._small, self._root = None, _trie(small)

    @classmethod
    def _make(cls, small: dict[K, V] | None, root: tuple[Any, ...], n: int) -> PMap[K, V]:
        new = cls.__new__(cls)
        new._small, new._root, new._len = small, root, n
        return new

    def set(self, key: K, value: V) -> PMap[K, V]:
        small = self._small
        if small is not None:
            if len(small) < SMALL or key in small:
                new = {**small, key: value}
                return self._make(new, _EMPTY, len(new))
            root: tuple[Any, ...] = _trie(small)
        else:
            root = self._root
        root, added = _set(root, 0, hash(key), key, value)
        return self._make(None, root, self._len + added)

    def delete(self, key: K) -> PMap[K, V]:
        """This map without `key` (the same map when it is not there)."""
        small = self._small
        if small is not None:
            if key not in small:
                return self
            new = {k: v for k, v in small.items() if k != key}
            return self._make(new, _EMPTY, len(new))
        root = _delete(self._root, 0, hash(key), key)
        return self if root is None else self._make(None, root, self._len - 1)

    def __getitem__(self, key: K) -> V:
        if self._small is not None:
            return self._small[key]
        value = _get(self._root, hash(key), key, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return value  # type: ignore[no-any-return]

    def get(self, key: K, default: Any = None) -> Any:
        if self._small is not None:
            return self._small.get(key, default)
        return _get(self._root, hash(key), key, default)

    def __contains__(self, key: object) -> bool:
        if self._small is not None:
            return key in self._small
        return _get(self._root, hash(key), key, _MISSING) is not _MISSING

    def __iter__(self) -> Iterator[K]:
        if self._small is not None:
            return iter(self._small)
        return (k for k, _ in _walk(self._root))

    def items(self) -> Iterator[tuple[K, V]]:  # type: ignore[override]
        if self._small is not None:
            return iter(self._small.items())
        return _walk(self._root)

    def values(self) -> Iterator[V]:  # type: ignore[override]
        if self._small is not None:
            return iter(self._small.values())
        return (v for _, v in _walk(self._root))

    def __len__(self) -> int:
        return self._len

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mapping) or len(other) != len(self):
            return False
        return all(other.get(k, _MISSING) == v for k, v in self.items())

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"PMap({dict(self.items())!r})"


_MISSING = object()


def _trie(pairs: Mapping[Any, Any]) -> tuple[Any, ...]:
    root: tuple[Any, ...] = _EMPTY
    for key, value in pairs.items():
        root, _ = _set(root, 0, hash(key), key, value)
    return root
