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
