"""Tiers: device slots <- host memory (bounded bytes) <- disk. Adapters past the host bound keep their
name and version, report DISK, and are re-read on use with the same results; pinned ones stay."""


class DirTier:
    """The disk tier over adapter directories (the server's is its AdapterStore)."""

    def __init__(self, paths: dict) -> None:
        self.paths, self.reads = paths, []

    def load_files(self, task):
        self.reads.append(task)
        return read_adapter_dir(self.paths[task])

    def version_of(self, task):
        return adapter_version(read_adapter_dir(self.paths[task]))

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
