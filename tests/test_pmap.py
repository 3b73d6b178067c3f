"""The persistent map behind a job's per-rank bookkeeping: a dict that is never mutated."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from lrpilot.controller.pmap import SMALL, PMap


class Collide:
    """Keys with one hash: they share a bucket."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __hash__(self) -> int:
        return 7

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Collide) and other.n == self.n


ops = st.lists(
    st.tuples(st.booleans(), st.integers(-300, 300) | st.text(max_size=3), st.integers()),
    max_size=400,
)


@settings(max_examples=60, deadline=None)
@given(ops)
def test_a_pmap_equals_a_dict_after_any_sets_and_deletes_and_old_versions_stay(
    steps: list[tuple[bool, object, int]],
) -> None:
    m: PMap[object, int] = PMap()
    d: dict[object, int] = {}
    versions = [(m, dict(d))]
    for delete, key, value in steps:
        if delete:
            m = m.delete(key)
            d.pop(key, None)
        else:
            m = m.set(key, value)
            d[key] = value
        versions.append((m, dict(d)))
    for old, expected in versions:  # every version is unchanged by what came after it
        assert dict(old.items()) == expected and len(old) == len(expected)
        assert all(old[k] == v and k in old for k, v in expected.items())
        assert old == expected


def test_colliding_keys_and_large_maps() -> None:
    m: PMap[object, int] = PMap()
    for i in range(SMALL * 40):
        m = m.set(Collide(i % 50) if i % 3 == 0 else i, i)
    assert len(m) == len(dict(m.items()))
    assert m[Collide(3)] == max(i for i in range(SMALL * 40) if i % 3 == 0 and i % 50 == 3)
    smaller = m.delete(Collide(3))
    assert Collide(3) not in smaller and Collide(3) in m and len(smaller) == len(m) - 1
    assert m.get("absent", -1) == -1 and smaller.delete("absent") is smaller
