"""Tiers: device slots <- host memory (bounded bytes) <- disk. Adapters past the host bound keep their
name and version, report DISK, and are re-read on use with the same results; pinned ones stay."""


class DirTier:
    """The disk tier over adapter directories (the server's is its AdapterStore)."""

    def __init__(self, paths: dict) -> None:
        self.paths, self.reads = paths, []

    def load_files(self, task, version=None):
        self.reads.append(task)
        return read_adapter_dir(self.paths[task])

    def holds(self, task, version):
        return adapter_version(read_adapter_dir(self.paths[task])) == version

    def release(self, task, version):
        pass

from adapterserve.adapters.peft_lora import adapter_version, read_adapter_dir
from adapterserve.runtime.config import RuntimeConfig
from adapterserve.runtime.runtime import Runtime
from tiny_models import FAMILY_TARGETS, SAMPLE_TEXTS, make_peft_adapter


def test_host_bound_moves_adapters_to_disk_and_back(tiny_bases, tmp_path):
    base = tiny_bases["bert"]
    paths = {f"t{i}": make_peft_adapter(base, str(tmp_path / f"t{i}"), num_labels=2 + i, r=4,
                                        targets=FAMILY_TARGETS["bert"], seed=i) for i in range(5)}
    reference = Runtime(RuntimeConfig(base_model=base, slots=8, r_max=8))
    for t, p in paths.items():
        reference.add_adapter(t, p)
    one = reference.host_tier._cost(reference.registry.get("t0"))
    # Host memory holds the parsed tensors only, not the file bytes beside them.
    entry = reference.registry.get("t0")
    assert entry.spec.files == {} and one == entry.spec.tensor_bytes() > 0
    assert entry.spec.size_bytes > 0  # the file size is still reported (GetAdapter / ListAdapters)
    disk = DirTier(paths)
    rt = Runtime(RuntimeConfig(base_model=base, slots=3, r_max=8, max_host_adapter_bytes=int(2.5 * one)), disk=disk)
    for t, p in paths.items():
        rt.add_adapter(t, p)
    residency = {a.task: a.residency for a in rt.list_adapters()}
    assert list(residency.values()).count("HOST") == 2 and list(residency.values()).count("DISK") == 3, residency
    assert rt.host_tier.bytes <= 2.5 * one
    items = [(f"t{i % 5}", SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)]) for i in range(20)]
    got = rt.classify(items)
    want = reference.classify(items)
    for g, w in zip(got, want):
        assert g.adapter_version == w.adapter_version
        assert max(abs(a - b) for a, b in zip(g.logits, w.logits)) <= 1e-5
    assert disk.reads, "adapters on disk were re-read"
    assert {a.version for a in rt.list_adapters()} == {a.version for a in reference.list_adapters()}
    assert rt.host_tier.bytes <= 2.5 * one


def test_pinned_adapters_are_never_evicted_from_host(tiny_bases, tmp_path):
    base = tiny_bases["bert"]
    a = make_peft_adapter(base, str(tmp_path / "a"), num_labels=2, seed=1)
    b = make_peft_adapter(base, str(tmp_path / "b"), num_labels=2, seed=2)
    rt = Runtime(RuntimeConfig(base_model=base, slots=4, r_max=8, max_host_adapter_bytes=1), disk=DirTier({"a": a, "b": b}))
    rt.add_adapter("a", a)
    pinned = rt.registry.acquire("a")
    rt.add_adapter("b", b)  # over the bound, but "a" is pinned by a request
    assert rt.host_tier.in_memory(pinned) and pinned.spec.modules
    rt.registry.release(pinned)
    assert rt.classify([("a", "x")])[0].adapter_version == pinned.version


def test_without_a_disk_nothing_is_evicted(tiny_bases, tmp_path):
    base = tiny_bases["bert"]
    rt = Runtime(RuntimeConfig(base_model=base, slots=4, r_max=8, max_host_adapter_bytes=1))
    for i in range(3):
        rt.add_adapter(f"t{i}", make_peft_adapter(base, str(tmp_path / f"t{i}"), num_labels=2, seed=i))
    assert {a.residency for a in rt.list_adapters()} == {"HOST"}


def test_a_replaced_version_still_in_use_is_read_back_from_disk(tiny_bases, tmp_path):
    """A request pinned to version 1, evicted to the disk tier, while the task is replaced by version 2:
    its rows still run version 1 (read back from blobs the store retains), and once the request lets
    go, version 1's blobs are freed."""
    import os

    from adapterserve.adapters.store import AdapterStore

    base = tiny_bases["bert"]
    v1 = make_peft_adapter(base, str(tmp_path / "v1"), num_labels=2, r=4, targets=FAMILY_TARGETS["bert"], seed=1)
    v2 = make_peft_adapter(base, str(tmp_path / "v2"), num_labels=2, r=4, targets=FAMILY_TARGETS["bert"], seed=2)
    store = AdapterStore(str(tmp_path / "data"))
    rt = Runtime(RuntimeConfig(base_model=base, slots=2, r_max=8, max_host_adapter_bytes=1), disk=store)  # one slot
    reference = Runtime(RuntimeConfig(base_model=base, slots=4, r_max=8))
    reference.add_adapter("t", v1)

    def register(path, replace):
        spec = rt.load_spec(path)
        if replace:
            store.retain("t")  # as the server's AdapterService does before a replace
        store.put("t", spec.files, spec.version, spec.labels, spec.metadata, 0.0)
        rt.add_adapter("t", spec, replace=replace)
        return spec.version

    first = register(v1, replace=False)
    rt.classify([("t", SAMPLE_TEXTS[0])])  # a request came and went: idle, its tensors evicted from host
    rt.add_adapter("other", v2)
    rt.classify([("other", SAMPLE_TEXTS[0])])  # takes the one slot
    assert rt.get_adapter("t").residency == "DISK"
    pinned = rt.registry.acquire("t")
    second = register(v2, replace=True)
    assert second != first and rt.get_adapter("t").version == second
    rows = rt.encode_rows([pinned], SAMPLE_TEXTS[:3], None, True)
    rt.infer(rows)  # loads version 1 into a slot: read back from the retained blobs
    want = reference.classify([("t", t) for t in SAMPLE_TEXTS[:3]])
    for row, w in zip(rows, want):
        assert row.prediction.adapter_version == first
        assert max(abs(a - b) for a, b in zip(row.prediction.logits, w.logits)) <= 1e-5
    rt.registry.release(pinned)  # the last user: version 1 retires and its blobs go
    current = set(store.entry("t")["files"].values())
    assert set(os.listdir(os.path.join(store.root, "blobs"))) == current


def test_vector_kinds_move_to_disk_and_back(tiny_bases, tmp_path):
    """IA3 and DoRA carry per-feature vectors: evicted to disk and read back like LoRA tensors."""
    from tiny_models import make_peft_kind_adapter

    base = tiny_bases["bert"]
    paths = {"ia3": make_peft_kind_adapter(base, str(tmp_path / "ia3"), "ia3", num_labels=2, scale=1.0,
                                           targets=["key", "value", "output.dense"], seed=1),
             "dora": make_peft_kind_adapter(base, str(tmp_path / "dora"), "dora", num_labels=3, r=4, scale=0.5,
                                            targets=FAMILY_TARGETS["bert"][:4], seed=2),
             "lora": make_peft_adapter(base, str(tmp_path / "lora"), num_labels=4, r=4, seed=3)}
    reference = Runtime(RuntimeConfig(base_model=base, slots=8, r_max=8))
    for t, p in paths.items():
        reference.add_adapter(t, p)
    disk = DirTier(paths)
    smallest = min(reference.host_tier._cost(reference.registry.get(t)) for t in paths)
    rt = Runtime(RuntimeConfig(base_model=base, slots=2, r_max=8, max_host_adapter_bytes=smallest), disk=disk)
    for t, p in paths.items():
        rt.add_adapter(t, p)
    assert "DISK" in {a.residency for a in rt.list_adapters()}
    items = [(t, SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)]) for i in range(12) for t in paths]
    for g, w in zip(rt.classify(items), reference.classify(items)):
        assert max(abs(a - b) for a, b in zip(g.logits, w.logits)) <= 1e-5
    assert {"ia3", "dora"} & set(disk.reads), disk.reads
