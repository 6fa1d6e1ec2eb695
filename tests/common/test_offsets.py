"""Committing below the lowest unfinished offset, whatever order records finish in."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from services.common.delivery.offsets import PartitionOffsets


def test_nothing_seen_commits_nothing() -> None:
    assert PartitionOffsets().committable() is None


def test_commit_stops_at_the_lowest_unfinished_offset() -> None:
    p = PartitionOffsets()
    for o in (10, 11, 12, 13):
        p.add(o)
    p.done(12)
    p.done(11)
    assert p.committable() == 10
    p.done(10)
    assert p.committable() == 13
    p.done(13)
    assert p.committable() == 14
    assert p.pending == 0


def test_offsets_seen_again_after_a_seek_are_ignored() -> None:
    p = PartitionOffsets()
    p.add(5)
    p.add(6)
    p.add(5)
    p.done(5)
    assert p.committable() == 6
    assert p.pending == 1


@given(st.permutations(list(range(30))), st.integers(min_value=0, max_value=30))
def test_committable_is_always_the_first_unfinished(order: list[int], finished: int) -> None:
    p = PartitionOffsets()
    for o in range(100, 130):
        p.add(o)
    done = {100 + o for o in order[:finished]}
    for o in done:
        p.done(o)
    first_unfinished = next((o for o in range(100, 130) if o not in done), 130)
    assert p.committable() == first_unfinished
