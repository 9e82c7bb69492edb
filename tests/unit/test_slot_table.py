import pytest

from adapterserve.runtime.errors import ResourceExhaustedError
from adapterserve.runtime.slots import SlotTable


def make(slots):
    events = []
    table = SlotTable(slots, on_load=lambda s, k: events.append(("load", s, k)),
                      on_evict=lambda s, k: events.append(("evict", s, k)))
    return table, events


def test_slot_zero_is_never_handed_out_and_hits_are_counted():
    table, events = make(3)
    a = table.acquire("a")
    b = table.acquire("b")
    assert {a, b} == {1, 2}
    assert table.acquire("a") == a
    assert (table.hits, table.misses, table.loads) == (1, 2, 2)


def test_lru_evicts_oldest_unpinned():
    table, events = make(3)
    table.acquire("a"); table.release("a")
    table.acquire("b"); table.release("b")
    table.acquire("a"); table.release("a")  # a is now most recent
    slot = table.acquire("c")
    assert ("evict", slot, "b") in events
    assert table.slot_of("b") is None and table.slot_of("a") is not None


def test_pinned_adapters_are_never_evicted():
    table, _ = make(3)
    table.acquire("a")
    table.acquire("b")
    with pytest.raises(ResourceExhaustedError, match="pinned"):
        table.acquire("c")
    table.release("b")
    table.acquire("c")
    assert table.slot_of("a") is not None and table.slot_of("b") is None


def test_drop_frees_the_slot_and_refuses_pinned():
    table, events = make(2)
    table.acquire("a")
    with pytest.raises(RuntimeError):
        table.drop("a")
    table.release("a")
    table.drop("a")
    assert table.resident() == [] and table.acquire("b") == 1


def test_acquire_all_resident_pins_every_key_or_changes_nothing():
    table, events = make(4)
    for k in ("a", "b", "c"):
        table.acquire(k)
        table.release(k)
    hits = table.hits
    assert table.acquire_all_resident(["c", "x"]) is None  # x is not resident: nothing pinned or moved
    assert table.hits == hits and table.resident() == ["a", "b", "c"]
    slots = table.acquire_all_resident(["a", "b"])
    assert slots == [table.slot_of("a"), table.slot_of("b")] and table.hits == hits + 2
    assert table.resident() == ["c", "a", "b"]  # used now: the newest
    with pytest.raises(RuntimeError):  # pinned: a running batch still reads them
        table.drop("a")
    slot = table.acquire("d")  # the one unpinned adapter goes
    assert ("evict", slot, "c") in events
    table.release_all(["a", "b"])
    table.drop("a")
    assert table.slot_of("a") is None and ("evict", slots[0], "a") in events
