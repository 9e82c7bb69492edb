"""LoKr above r_max served from its Kronecker factors (adapters/spec.KroneckerModule,
slot_layers.KronForm, lora_kernel.c kron_runs): the native kernel and the torch path against float64
within the bound of their summation order; whole and low-rank second factors, rank and alpha patterns
that leave some modules at LoRA's rank, decompose_both, the BERT pooler, mixed in one batch with LoRA
and other LoKr tasks, equal PEFT's own model on each adapter alone (max |Δlogit| <= 1e-4, fp32) on tiny
BERT, DistilBERT, RoBERTa, DeBERTa-v2 (its shared positional input) and ModernBERT, token-packed and
padded, and PEFT's default LoKr on the packaged MiniLM; more LoKr tasks than slots through the disk
tier; the engines and modes that cannot apply the factors refuse them at registration."""
import numpy as np
import pytest
import torch

from adapterserve.adapters.spec import KroneckerModule
from adapterserve.adapters.store import AdapterStore
from adapterserve.runtime.config import RuntimeConfig
from adapterserve.runtime.engine.reference import reference_logits
from adapterserve.runtime.engine.slot_layers import KronForm
from adapterserve.runtime.errors import NotSupportedError
from adapterserve.runtime.native import lora_kernel
from adapterserve.runtime.runtime import Runtime
from tiny_models import FAMILY_TARGETS, SAMPLE_TEXTS, make_peft_adapter, make_peft_kind_adapter, model_type, peft_logits
from tolerance import U32, gamma

pytestmark = pytest.mark.native  # run again with ADAPTERSERVE_NATIVE=off (.ci/run)

TOL = 1e-4


# ---- the apply itself, against float64 ---------------------------------------------------------------

def _module(out_l, out_k, in_m, in_n, k1=None, k2=None, seed=0) -> KroneckerModule:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    u1, v1 = (rand(out_l, in_m), None) if k1 is None else (rand(out_l, k1), rand(k1, in_m))
    u2, v2 = (rand(out_k, in_n), None) if k2 is None else (rand(out_k, k2), rand(k2, in_n))
    return KroneckerModule("m", u1, v1, u2, v2)


def _exact(m: KroneckerModule, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ΔW x in float64, and the bound on a float32 evaluation in the order KronForm applies it: sums of
    in_n terms (X P), k (· Q), in_m (W1 ·), each error at most gamma(terms) times the sum of the
    magnitudes of its products, carried through the later products: gamma(in_n + k + in_m) |W1| |X| |P| |Q|."""
    out_l, out_k, in_m, in_n = m.dims
    form = KronForm.of(m, torch.device("cpu"), torch.float32)
    n = x.shape[0]
    x64 = x.double().reshape(n, in_m, in_n)
    p, q, w1 = form.p.double(), (form.q.double() if form.q is not None else None), form.w1.double()
    chain = p if q is None else p @ q
    chain_mag = p.abs() if q is None else p.abs() @ q.abs()
    exact = torch.matmul(w1, x64 @ chain).reshape(n, -1)
    magnitude = torch.matmul(w1.abs(), x64.abs() @ chain_mag).reshape(n, -1)
    k = 0 if q is None else q.shape[0]
    return exact, gamma(in_n + k + in_m) * magnitude


# (out_l, out_k, in_m, in_n, k1, k2): MiniLM's q (PEFT's default: W2 a rank-8 pair), its feed-forward
# linears, a whole W2, a low-rank W1 (decompose_both), factors of sizes no vector divides.
SHAPES = [(16, 24, 16, 24, None, 8), (32, 48, 16, 24, None, 8), (16, 24, 32, 48, None, 8),
          (4, 8, 4, 8, None, None), (4, 8, 8, 4, 2, 3), (2, 24, 6, 8, None, 5)]


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("threads", [1, 2])
def test_fused_kernel_and_torch_path_apply_the_factors_within_float64_bound(packed, threads):
    """The fused LoRA kernel adds each LoKr row's update with the LoRA rows' deltas (lora_rows[_packed]
    with a factor table), real tokens only; the torch path (KronForm.delta) the same; both against float64
    within the bound of their summation order. Rows of a LoRA slot and of slot 0 are as without factors."""
    kernel = lora_kernel.load()
    gen = torch.Generator().manual_seed(1)
    for shape in SHAPES:
        out_l, out_k, in_m, in_n, k1, k2 = shape
        d_in, d_out = in_m * in_n, out_l * out_k
        forms = {s: KronForm.of(_module(out_l, out_k, in_m, in_n, k1, k2, seed=s), torch.device("cpu"), torch.float32)
                 for s in (2, 3, 5)}
        table = np.zeros((6, 8), dtype=np.int64)
        for s, form in forms.items():
            table[s] = form.params
        a = torch.zeros(6, 8, d_in)
        b = torch.zeros(6, 8, d_out)
        a[4] = torch.randn(8, d_in, generator=gen)
        b[4] = torch.randn(8, d_out, generator=gen) * 0.1
        r8 = torch.tensor([0, 0, 0, 0, 8, 0])
        slots = torch.tensor([2, 0, 3, 4, 5, 2, 3])
        lengths = [17, 3, 1, 9, 12, 8, 20]  # across the kernel's 2-token steps; one row of one token
        T = max(lengths)
        x_rows = torch.randn(len(lengths), T, d_in, generator=gen)
        y_rows = torch.randn(len(lengths), T, d_out, generator=gen)
        want = y_rows.double().clone()
        bound = torch.zeros_like(want)
        for i, (s, n) in enumerate(zip(slots.tolist(), lengths)):
            if s in forms:
                exact, err = _exact(_module(out_l, out_k, in_m, in_n, k1, k2, seed=s), x_rows[i, :n])
            elif s == 4:
                exact = (x_rows[i, :n].double() @ a[4].double().t()) @ b[4].double()
                err = gamma(d_in) * (x_rows[i, :n].double().abs() @ a[4].double().abs().t()) @ b[4].double().abs() \
                    + gamma(8) * ((x_rows[i, :n].double() @ a[4].double().t()).abs() @ b[4].double().abs())
            else:
                continue
            want[i, :n] += exact
            bound[i, :n] = err + U32 * (y_rows[i, :n].double().abs() + exact.abs())
        torch_path = y_rows.clone()
        for i, (s, n) in enumerate(zip(slots.tolist(), lengths)):
            if s in forms:
                torch_path[i, :n] += forms[s].delta(x_rows[i, :n])
            elif s == 4:
                torch_path[i, :n] += (x_rows[i, :n] @ a[4].t()) @ b[4]
        assert ((torch_path.double() - want).abs() <= bound).all(), shape
        if kernel is None:
            continue
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            if packed:
                offsets = torch.tensor([0] + lengths).cumsum(0)
                x = torch.cat([x_rows[i, :n] for i, n in enumerate(lengths)]).unsqueeze(0)
                y = torch.cat([y_rows[i, :n] for i, n in enumerate(lengths)]).unsqueeze(0)
                kernel.packed(x, y, a, b, r8, slots, offsets, kron=table)
                got = y_rows.clone()
                for i, n in enumerate(lengths):
                    got[i, :n] = y[0, offsets[i]:offsets[i] + n]
            else:
                got = y_rows.clone()
                kernel(x_rows, got, a, b, r8, slots, torch.tensor(lengths), kron=table)
        finally:
            torch.set_num_threads(previous)
        over = (got.double() - want).abs() - bound
        assert (over <= 0).all(), f"{shape}: {over.max().item()} over the bound"
        for i, n in enumerate(lengths):  # past each row's length, and slot 0's row: untouched
            assert torch.equal(got[i, n:], y_rows[i, n:])
        assert torch.equal(got[1], y_rows[1])
        # a wrong term is of the order of the values, far above the bound
        assert (want - y_rows.double()).abs().max() > 100 * bound.max()


def test_conversion_below_r_max_is_exact_and_the_rank_is_its_factors():
    for out_l, out_k, in_m, in_n, k1, k2 in SHAPES:
        m = _module(out_l, out_k, in_m, in_n, k1, k2)
        a, b = m.as_lora()
        assert a.shape[1] == m.rank == (min(out_l, in_m) if k1 is None else k1) * (min(out_k, in_n) if k2 is None else k2)
        x = torch.randn(5, in_m * in_n)
        exact, err = _exact(m, x)
        via_lora = (x.double() @ a.double()) @ b.double()
        assert ((via_lora - exact).abs() <= err * 4).all()


# ---- against PEFT -------------------------------------------------------------------------------------

def _lokr(base, root, name, seed, **kw):
    return make_peft_kind_adapter(base, str(root / name), "lokr", seed=seed, scale=kw.pop("scale", 0.3), **kw)


def lokr_set(base, root):
    """On hidden 32 (4 x 8) with r_max 8: every LoKr here but `converted` is above it somewhere."""
    t = FAMILY_TARGETS[model_type(base)]
    return {
        "lora": make_peft_adapter(base, str(root / "lora"), num_labels=2, r=4, targets=t[:3], seed=1, scale=0.5),
        # W2 a rank-3 pair (rank 4·3 = 12 as LoRA), attention and feed-forward linears
        "pair": _lokr(base, root, "pair", 2, num_labels=3, r=3, alpha=6, targets=t),
        # W2 whole (r 8 is not below half its size): rank 32
        "whole": _lokr(base, root, "whole", 3, num_labels=4, r=8, alpha=8, targets=t[:4]),
        # r 2 everywhere (rank 8: LoRA in the slot) but 6 on the second target (W2 whole: its factors)
        "patterns": _lokr(base, root, "patterns", 4, num_labels=5, r=2, alpha=4, targets=t[:3],
                          rank_pattern={t[1]: 6}, alpha_pattern={t[2]: 1}),
        "converted": _lokr(base, root, "converted", 5, num_labels=2, r=2, alpha=4, targets=t[1:3]),
        "lora_b": make_peft_adapter(base, str(root / "lora_b"), num_labels=3, r=8, targets=t[2:], seed=6, scale=0.5),
    }


def check(rt, base, paths, texts=SAMPLE_TEXTS[:5]):
    items = [(task, text) for text in texts for task in paths]
    preds = rt.classify(items)
    worst = {}
    for task, path in paths.items():
        got = torch.tensor([p.logits for (t, _), p in zip(items, preds) if t == task])
        worst[task] = (got - peft_logits(base, path, texts)).abs().max().item()
    assert max(worst.values()) <= TOL, worst


@pytest.fixture(scope="module", params=["bert", "distilbert", "roberta", "deberta-v2", "modernbert"])
def family_set(request, tiny_bases, new_family_bases, tmp_path_factory):
    name = request.param
    base = tiny_bases[name] if name in tiny_bases else new_family_bases[name]
    return name, base, lokr_set(base, tmp_path_factory.mktemp(f"lokr_{name}"))


@pytest.mark.parametrize("lora_kernel,token_packing", [("auto", "auto"), ("torch", "auto"), ("auto", "off")])
def test_lokr_above_r_max_mixed_with_lora_matches_peft(family_set, lora_kernel, token_packing):
    name, base, paths = family_set
    rt = Runtime(RuntimeConfig(base_model=base, slots=8, r_max=8, lora_kernel=lora_kernel,
                               token_packing=token_packing))
    if token_packing == "off" and not rt.engine._packing_applies():
        pytest.skip(f"{name} has no token-packed path: the default run is its padded one")
    for task, path in paths.items():
        rt.add_adapter(task, path)
    specs = {task: rt.registry.get(task).spec for task in paths}
    assert specs["pair"].kron and not specs["pair"].modules and specs["whole"].kron
    second = FAMILY_TARGETS[model_type(base)][1]
    assert specs["patterns"].kron and all(n.endswith(second) for n in specs["patterns"].kron)
    assert specs["patterns"].modules and not any(n.endswith(second) for n in specs["patterns"].modules)
    assert not specs["converted"].kron and specs["converted"].rank == 8
    # no wide slot: Kronecker factors sit beside the slot's LoRA
    assert rt.engine.pool.wide_bytes() == 0 and {rt.get_adapter(t).rank for t in ("pair", "whole")} == {0}
    check(rt, base, paths)
    # loaded into slots by the batch: the factors' device bytes, counted in the memory metric
    held = sum(t.numel() * 4 for s in specs.values() for m in s.kron.values() for t in m.tensors())
    pool = rt.engine.pool
    assert 0 < pool.kron_bytes() <= 2 * held
    from adapterserve.runtime.server.metrics import MemoryCollector

    device = next(s.value for m in MemoryCollector(rt).collect() for s in m.samples
                  if s.name == "adapterserve_adapter_memory_bytes" and s.labels == {"tier": "device"})
    assert device == rt.engine.slot_bytes() * rt.config.slots + pool.bottleneck_bytes() + pool.kron_bytes()


def test_lokr_on_the_bert_pooler(tiny_bases, tmp_path):
    """The pooler's input is [rows, hidden] by row, also when the encoder runs token-packed."""
    base = tiny_bases["bert"]
    paths = {"pooler": _lokr(base, tmp_path, "pooler", 7, num_labels=3, r=3, alpha=6, targets=["query", "pooler.dense"]),
             "lora": make_peft_adapter(base, str(tmp_path / "lora"), num_labels=2, r=4, targets=["value"], seed=8)}
    for packing in ("auto", "off"):
        rt = Runtime(RuntimeConfig(base_model=base, slots=4, r_max=8, token_packing=packing))
        for task, path in paths.items():
            rt.add_adapter(task, path)
        assert "pooler.dense" in rt.registry.get("pooler").spec.kron
        check(rt, base, paths)


def test_default_lokr_on_the_packaged_minilm(minilm_dir, tmp_path):
    """PEFT's default LoKr (r 8) on every linear of MiniLM: rank 128 as LoRA, its factors here."""
    targets = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
    paths = {"lokr": _lokr(minilm_dir, tmp_path, "lokr", 9, num_labels=3, r=8, alpha=8, targets=targets, scale=0.05),
             "lora": make_peft_adapter(minilm_dir, str(tmp_path / "lora"), num_labels=2, r=8, targets=targets[:3],
                                       seed=10)}
    rt = Runtime(RuntimeConfig(slots=4))
    for task, path in paths.items():
        rt.add_adapter(task, path)
    spec = rt.registry.get("lokr").spec
    assert len(spec.kron) == 36 and max(m.rank for m in spec.kron.values()) == 128 and not spec.modules
    check(rt, minilm_dir, paths, SAMPLE_TEXTS[:3])
    # the pure-PyTorch reference (the factors as their LoRA form, merged into the weights) agrees
    want = peft_logits(minilm_dir, paths["lokr"], SAMPLE_TEXTS[:3])
    assert (reference_logits(minilm_dir, spec, SAMPLE_TEXTS[:3]) - want).abs().max().item() <= TOL


def test_more_lokr_tasks_than_slots_through_the_disk_tier(tiny_bases, tmp_path):
    """Slots are overwritten by other LoKr and LoRA tasks, host memory holds none, so every load reads
    the factors back from disk: every answer stays the adapter's."""
    base = tiny_bases["bert"]
    t = FAMILY_TARGETS["bert"]
    paths = {f"k{i}": _lokr(base, tmp_path, f"k{i}", 20 + i, num_labels=2 + i, r=3 + i % 2, alpha=4, targets=t[i:i + 3])
             for i in range(4)}
    paths["lora"] = make_peft_adapter(base, str(tmp_path / "lora"), num_labels=2, r=4, targets=t[:2], seed=30)
    store = AdapterStore(str(tmp_path / "data"))
    rt = Runtime(RuntimeConfig(base_model=base, slots=3, r_max=8, max_host_adapter_bytes=1), disk=store)
    for task, path in paths.items():
        spec = rt.load_spec(path)
        store.put(task, spec.files, spec.version, spec.labels, spec.metadata, 0.0)
        rt.add_adapter(task, spec)
    for _ in range(2):
        for task in paths:  # one task per call: each load evicts another's slot
            check(rt, base, {task: paths[task]}, SAMPLE_TEXTS[:2])
    assert rt.host_tier.reloads >= len(paths) and rt.slot_table.evictions >= len(paths)
    assert rt.get_adapter("k0").residency == "DISK"


def test_engines_and_modes_that_cannot_apply_the_factors_refuse(tiny_bases, tmp_path):
    base = tiny_bases["bert"]
    path = _lokr(base, tmp_path, "whole", 11, num_labels=3, r=8, alpha=8, targets=["query", "value"])
    rt = Runtime(RuntimeConfig(base_model=base, slots=4, r_max=8))
    rt.add_adapter("lokr", path)
    with pytest.raises(NotSupportedError, match="Kronecker factors"):
        rt.merge("lokr")
    onnx = Runtime(RuntimeConfig(base_model=base, slots=4, r_max=8, engine="onnx", onnx_dir=str(tmp_path / "onnx")))
    with pytest.raises(NotSupportedError, match=r"LOKR adapters above r_max 8 .* shared ONNX graph .* at least 32"):
        onnx.add_adapter("lokr", path)
    # up to its r_max the same adapter is LoRA, which the graph serves
    wide = Runtime(RuntimeConfig(base_model=base, slots=4, r_max=32, engine="onnx", onnx_dir=str(tmp_path / "onnx32")))
    wide.add_adapter("lokr", path)
    got = torch.tensor([p.logits for p in wide.classify([("lokr", s) for s in SAMPLE_TEXTS[:3]])])
    assert (got - peft_logits(base, path, SAMPLE_TEXTS[:3])).abs().max().item() <= TOL


def test_a_slot_reused_by_another_kind_drops_the_factors(tiny_bases, tmp_path):
    """A slot a LoKr task held, taken by a LoRA task and back: no factors left behind in any layer."""
    base = tiny_bases["bert"]
    t = FAMILY_TARGETS["bert"]
    paths = {"lokr": _lokr(base, tmp_path, "lokr", 12, num_labels=3, r=3, alpha=6, targets=t),
             "lora": make_peft_adapter(base, str(tmp_path / "lora"), num_labels=2, r=4, targets=t[:3], seed=13)}
    rt = Runtime(RuntimeConfig(base_model=base, slots=2, r_max=8))  # one slot for tasks
    for task, path in paths.items():
        rt.add_adapter(task, path)
    for task in ("lokr", "lora", "lokr", "lora"):
        check(rt, base, {task: paths[task]}, SAMPLE_TEXTS[:2])
    assert all(not layer.kron for layer in rt.engine.layers.values())
