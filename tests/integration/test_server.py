"""A real adapterserve process on a loopback port, the packaged MiniLM, real safetensors files."""
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import AUTH, read_files
from adapterserve.runtime.config import RuntimeConfig
from adapterserve.runtime.server.stubs import pb, pb_grpc
from adapterserve.runtime.runtime import Runtime
from adapterserve.loadtest.server_proc import ServerProcess

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "adapters", "examples")
SENTENCES = ["a gorgeous , witty , seductive movie .", "the plot is nothing but boilerplate clichés",
             "an utterly charming and hilarious film", "Oil prices rise as OPEC cuts output",
             "The Yankees beat the Red Sox 5-3 in extra innings", "Intel unveils a faster chip for laptops"]


@pytest.fixture(scope="module")
def offline(minilm_adapters):
    """In-process runtime with the same adapters: the scores each version must produce."""
    _, paths = minilm_adapters
    rt = Runtime(RuntimeConfig(slots=8))
    for name, path in paths.items():
        rt.add_adapter(name, path)
    return rt


def offline_scores(rt, task, texts):
    return [{s.label: s.score for s in p.scores} for p in rt.classify([(task, t) for t in texts])]


def assert_scores_close(response, expected, tol=1e-4):
    for pred, want in zip(response.predictions, expected):
        got = {s.label: s.score for s in pred.scores}
        assert got.keys() == want.keys()
        assert max(abs(got[k] - want[k]) for k in got) <= tol


def test_health_reflection_and_info(server, stubs):
    classifier, _ = stubs
    with grpc.insecure_channel(server.address) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="adapterserve.v1.Classifier"))
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in resp.list_services_response.service}
        assert {"adapterserve.v1.Classifier", "adapterserve.v1.AdapterRegistry", "grpc.health.v1.Health"} <= names
    info = classifier.GetInfo(pb.GetInfoRequest())
    assert info.precision == "fp32" and info.engine == "torch" and info.max_input_length == 512
    assert info.max_texts_per_request == 64


@pytest.mark.skipif(not os.path.isdir(os.path.join(EXAMPLES, "sst2")), reason="bundled adapters not trained yet")
def test_bundled_tasks_answer_sensibly(stubs):
    classifier, registry = stubs
    tasks = {a.task for a in registry.ListAdapters(pb.ListAdaptersRequest(), metadata=AUTH).adapters}
    assert {"sst2", "ag_news"} <= tasks
    r = classifier.Classify(pb.ClassifyRequest(task="sst2", texts=SENTENCES[:3], request_id="rid-1"))
    assert r.request_id == "rid-1" and r.task == "sst2" and len(r.adapter_version) == 64
    assert [p.scores[0].label for p in r.predictions] == ["positive", "negative", "positive"]
    r = classifier.Classify(pb.ClassifyRequest(task="ag_news", texts=SENTENCES[3:], top_k=1))
    assert [p.scores[0].label for p in r.predictions] == ["business", "sports", "sci_tech"]
    assert all(len(p.scores) == 1 for p in r.predictions)
    assert r.timings.total_ns >= r.timings.inference_ns > 0


def test_register_by_path_and_upload_then_classify(stubs, minilm_adapters, offline):
    classifier, registry = stubs
    _, paths = minilm_adapters
    a = registry.RegisterAdapter(pb.RegisterAdapterRequest(task="alpha", path="alpha", metadata={"owner": "t"}), metadata=AUTH)
    assert a.labels == ["no", "yes"] and a.rank == 4 and a.peft_type == "LORA" and a.metadata["owner"] == "t"
    b = registry.RegisterAdapter(pb.RegisterAdapterRequest(task="gamma_up", files=read_files(paths["gamma"])), metadata=AUTH)
    assert b.version == offline.get_adapter("gamma").version  # sha256 of the same files
    r = classifier.Classify(pb.ClassifyRequest(task="alpha", texts=SENTENCES))
    assert r.adapter_version == a.version
    assert_scores_close(r, offline_scores(offline, "alpha", SENTENCES))
    r = classifier.Classify(pb.ClassifyRequest(task="gamma_up", texts=SENTENCES, text_pairs=[]))
    assert_scores_close(r, offline_scores(offline, "gamma", SENTENCES))
    got = registry.GetAdapter(pb.GetAdapterRequest(task="alpha"), metadata=AUTH)
    assert got.version == a.version and got.residency in (pb.DEVICE, pb.HOST)


def test_replace_while_traffic_flows(stubs, server, offline):
    classifier, registry = stubs
    v1 = registry.RegisterAdapter(pb.RegisterAdapterRequest(task="swap", path="beta"), metadata=AUTH).version
    expected = {v1: offline_scores(offline, "beta", SENTENCES)}
    stop = threading.Event()
    seen, failures = [], []

    def hammer():
        with grpc.insecure_channel(server.address) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            while not stop.is_set():
                try:
                    seen.append(stub.Classify(pb.ClassifyRequest(task="swap", texts=SENTENCES), timeout=30))
                except grpc.RpcError as e:
                    failures.append((e.code(), e.details()))

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    v2 = registry.RegisterAdapter(pb.RegisterAdapterRequest(task="swap", path="beta2", replace=True), metadata=AUTH).version
    expected[v2] = offline_scores(offline, "beta2", SENTENCES)
    time.sleep(1.5)
    stop.set()
    for t in threads:
        t.join()
    assert not failures, failures[:3]
    versions = [r.adapter_version for r in seen]
    assert set(versions) == {v1, v2}, "traffic saw both versions"
    assert versions.index(v2) > 0 and v1 not in versions[versions.index(v2) + 3 * 2:], "no old version long after the swap"
    for r in seen:
        assert_scores_close(r, expected[r.adapter_version])


def test_unregister_then_not_found(stubs):
    classifier, registry = stubs
    registry.RegisterAdapter(pb.RegisterAdapterRequest(task="gone", path="gamma"), metadata=AUTH)
    classifier.Classify(pb.ClassifyRequest(task="gone", texts=["x"]))
    registry.UnregisterAdapter(pb.UnregisterAdapterRequest(task="gone"), metadata=AUTH)
    with pytest.raises(grpc.RpcError) as e:
        classifier.Classify(pb.ClassifyRequest(task="gone", texts=["x"]))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "gone" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        registry.UnregisterAdapter(pb.UnregisterAdapterRequest(task="gone"), metadata=AUTH)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def _code(call):
    try:
        call()
    except grpc.RpcError as e:
        return e.code(), e.details()
    return grpc.StatusCode.OK, ""


def test_bad_input_gets_the_right_code_while_others_are_served(stubs, server, minilm_adapters, tmp_path):
    classifier, registry = stubs
    root, paths = minilm_adapters
    registry.RegisterAdapter(pb.RegisterAdapterRequest(task="good", path="alpha", replace=True), metadata=AUTH)
    stop = threading.Event()
    ok, bad = [0], []

    def bystander():
        with grpc.insecure_channel(server.address) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            while not stop.is_set():
                try:
                    stub.Classify(pb.ClassifyRequest(task="good", texts=SENTENCES[:2]), timeout=30)
                    ok[0] += 1
                except grpc.RpcError as e:
                    bad.append(e.code())

    t = threading.Thread(target=bystander)
    t.start()
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(str(outside), os.path.join(root, "link_out"))
    files = read_files(paths["alpha"])
    C = grpc.StatusCode
    reg = lambda **kw: (lambda: registry.RegisterAdapter(pb.RegisterAdapterRequest(**kw), metadata=AUTH))  # noqa: E731
    cls = lambda **kw: (lambda: classifier.Classify(pb.ClassifyRequest(**kw)))  # noqa: E731
    cases = [
        ("unknown task", cls(task="nope", texts=["x"]), C.NOT_FOUND, "nope"),
        ("empty texts", cls(task="good", texts=[]), C.INVALID_ARGUMENT, "texts is empty"),
        ("too many texts", cls(task="good", texts=["x"] * 65), C.INVALID_ARGUMENT, "limit is 64"),
        ("1 MB text", cls(task="good", texts=["word " * 200_000], truncate=False), C.INVALID_ARGUMENT, "truncate=true"),
        ("pairs length", cls(task="good", texts=["a", "b"], text_pairs=["c"]), C.INVALID_ARGUMENT, "text_pairs has 1"),
        ("path outside", reg(task="p1", path="/etc"), C.PERMISSION_DENIED, "outside the allowed adapter root"),
        ("dotdot", reg(task="p2", path="../../"), C.PERMISSION_DENIED, "outside"),
        ("symlink out", reg(task="p3", path="link_out"), C.PERMISSION_DENIED, "outside"),
        ("not safetensors", reg(task="u1", files=pb.AdapterFiles(adapter_config=files.adapter_config, adapter_weights=b"PK\x03\x04 zip?")),
         C.INVALID_ARGUMENT, "safetensors"),
        ("truncated", reg(task="u2", files=pb.AdapterFiles(adapter_config=files.adapter_config,
                                                          adapter_weights=files.adapter_weights[: len(files.adapter_weights) // 2])),
         C.INVALID_ARGUMENT, "truncated"),
        ("over size limit", reg(task="u3", files=pb.AdapterFiles(adapter_config=files.adapter_config, adapter_weights=b"\0" * (5 << 20))),
         C.RESOURCE_EXHAUSTED, "limit"),
        ("no token", lambda: registry.ListAdapters(pb.ListAdaptersRequest()), C.UNAUTHENTICATED, "Bearer"),
        ("wrong token", lambda: registry.ListAdapters(pb.ListAdaptersRequest(), metadata=(("authorization", "Bearer nope"),)),
         C.UNAUTHENTICATED, "wrong"),
        ("name taken", reg(task="good", path="alpha"), C.ALREADY_EXISTS, "replace=true"),
        ("1 ms deadline", lambda: classifier.Classify(pb.ClassifyRequest(task="good", texts=SENTENCES * 10), timeout=0.001),
         C.DEADLINE_EXCEEDED, ""),
    ]
    try:
        for name, call, code, words in cases:
            got, details = _code(call)
            assert got == code, f"{name}: {got} {details}"
            assert words in details, f"{name}: {details!r} lacks {words!r}"
        # Queue flood: far more texts at once than --max-queue 256 admits.
        with ThreadPoolExecutor(32) as pool:
            results = list(pool.map(lambda _: _code(cls(task="good", texts=SENTENCES * 10)), range(64)))
        codes = [c for c, _ in results]
        assert C.RESOURCE_EXHAUSTED in codes and C.OK in codes, codes
        assert set(codes) <= {C.OK, C.RESOURCE_EXHAUSTED}
        # One connection: its share of the queue (fair admission) is reached before the queue itself.
        assert all("queue" in d for c, d in results if c == C.RESOURCE_EXHAUSTED)
        assert any("share of the queue" in d or "queue is full" in d for c, d in results if c == C.RESOURCE_EXHAUSTED)
        time.sleep(0.5)
        assert _code(cls(task="good", texts=SENTENCES))[0] == C.OK  # normal service again
    finally:
        stop.set()
        t.join()
    assert not bad, bad[:5]
    assert ok[0] > 0
    assert "Traceback" not in server.log()


def test_restart_restores_tasks_and_versions(minilm_adapters, tmp_path):
    root, paths = minilm_adapters
    data_dir = str(tmp_path / "data")
    first = ServerProcess("--data-dir", data_dir, "--adapter-root", root, "--no-examples")
    try:
        with grpc.insecure_channel(first.address) as ch:
            reg = pb_grpc.AdapterRegistryStub(ch)
            reg.RegisterAdapter(pb.RegisterAdapterRequest(task="alpha", path="alpha"))
            reg.RegisterAdapter(pb.RegisterAdapterRequest(task="up", files=read_files(paths["beta"]), labels=["p", "q", "r"]))
            reg.RegisterAdapter(pb.RegisterAdapterRequest(task="tmp", path="gamma"))
            reg.UnregisterAdapter(pb.UnregisterAdapterRequest(task="tmp"))
            before = {a.task: (a.version, list(a.labels)) for a in reg.ListAdapters(pb.ListAdaptersRequest()).adapters}
            scores = pb_grpc.ClassifierStub(ch).Classify(pb.ClassifyRequest(task="up", texts=SENTENCES))
    finally:
        assert first.stop() == 0
    second = ServerProcess("--data-dir", data_dir, "--adapter-root", root, "--no-examples")
    try:
        with grpc.insecure_channel(second.address) as ch:
            after = {a.task: (a.version, list(a.labels)) for a in
                     pb_grpc.AdapterRegistryStub(ch).ListAdapters(pb.ListAdaptersRequest()).adapters}
            again = pb_grpc.ClassifierStub(ch).Classify(pb.ClassifyRequest(task="up", texts=SENTENCES))
    finally:
        second.stop()
    assert after == before and set(after) == {"alpha", "up"} and after["up"][1] == ["p", "q", "r"]
    flat = lambda r: [s.score for p in r.predictions for s in p.scores]  # noqa: E731
    assert flat(again) == pytest.approx(flat(scores), abs=1e-5)


def test_sigterm_drains_inflight_and_exits_zero(minilm_adapters, tmp_path):
    root, _ = minilm_adapters
    proc = ServerProcess("--data-dir", "", "--adapter-root", root, "--no-examples", "--grace", "20")
    with grpc.insecure_channel(proc.address) as ch:
        pb_grpc.AdapterRegistryStub(ch).RegisterAdapter(pb.RegisterAdapterRequest(task="alpha", path="alpha"))
        stub = pb_grpc.ClassifierStub(ch)
        futures = [stub.Classify.future(pb.ClassifyRequest(task="alpha", texts=SENTENCES * 10)) for _ in range(6)]
        time.sleep(0.2)
        import signal

        proc.proc.send_signal(signal.SIGTERM)
        results = [f.result(timeout=60) for f in futures]
    assert all(len(r.predictions) == 60 for r in results)
    assert proc.proc.wait(60) == 0


def test_disk_tier_over_grpc(minilm_adapters, offline, tmp_path):
    root, paths = minilm_adapters
    proc = ServerProcess("--data-dir", str(tmp_path / "data"), "--adapter-root", root, "--no-examples",
                         "--max-host-adapter-bytes", str(300_000), "--slots", "2")
    try:
        with grpc.insecure_channel(proc.address) as ch:
            reg, cls = pb_grpc.AdapterRegistryStub(ch), pb_grpc.ClassifierStub(ch)
            for name in ("alpha", "beta", "gamma"):
                reg.RegisterAdapter(pb.RegisterAdapterRequest(task=name, path=name))
            residency = {a.task: a.residency for a in reg.ListAdapters(pb.ListAdaptersRequest()).adapters}
            assert pb.DISK in residency.values(), residency
            for _ in range(2):
                for name in ("alpha", "beta", "gamma"):
                    r = cls.Classify(pb.ClassifyRequest(task=name, texts=SENTENCES))
                    assert_scores_close(r, offline_scores(offline, name, SENTENCES))
    finally:
        proc.stop()


def test_tls(minilm_adapters, tmp_path):
    import subprocess

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    proc = ServerProcess("--data-dir", "", "--tls-cert", str(cert), "--tls-key", str(key), "--no-examples",
                         tls_ca=str(cert))
    try:
        creds = grpc.ssl_channel_credentials(cert.read_bytes())
        with grpc.secure_channel(proc.address, creds) as ch:
            assert pb_grpc.ClassifierStub(ch).GetInfo(pb.GetInfoRequest()).engine == "torch"
        with grpc.insecure_channel(proc.address) as ch:  # plaintext to a TLS port fails
            with pytest.raises(grpc.RpcError):
                pb_grpc.ClassifierStub(ch).GetInfo(pb.GetInfoRequest(), timeout=5)
    finally:
        proc.stop()


def test_two_model_workers_answer_like_one(minilm_adapters, offline):
    """--model-workers 2 runs two forwards at once; with 3 slots for 4 tasks they also load and evict
    slots while the other forward runs. Every answer must still be the in-process one."""
    import random

    root, paths = minilm_adapters
    proc = ServerProcess("--data-dir", "", "--adapter-root", root, "--no-examples", "--model-workers", "2",
                         "--slots", "4", "--max-batch-size", "4")
    tasks = sorted(paths)
    try:
        with grpc.insecure_channel(proc.address) as ch:
            reg, cls = pb_grpc.AdapterRegistryStub(ch), pb_grpc.ClassifierStub(ch)
            for name in tasks:
                reg.RegisterAdapter(pb.RegisterAdapterRequest(task=name, path=name))
            expected = {t: offline_scores(offline, t, SENTENCES) for t in tasks}

            def client(seed):
                rng = random.Random(seed)
                for _ in range(12):
                    task = rng.choice(tasks)
                    idx = rng.sample(range(len(SENTENCES)), rng.randint(1, 4))
                    r = cls.Classify(pb.ClassifyRequest(task=task, texts=[SENTENCES[i] for i in idx]), timeout=60)
                    assert_scores_close(r, [expected[task][i] for i in idx])

            with ThreadPoolExecutor(8) as pool:
                for f in [pool.submit(client, s) for s in range(8)]:
                    f.result()
    finally:
        proc.stop()


def test_adapterhub_bottleneck_by_path_serves_and_survives_a_restart(minilm_dir, tmp_path):
    """An AdapterHub directory (adapter.safetensors + its head) registered by path over gRPC answers as
    the `adapters` library does, and the data dir brings it back after a restart."""
    from tiny_models import adapterhub_logits, make_adapterhub_bottleneck

    root = tmp_path / "adapters"
    path = make_adapterhub_bottleneck(minilm_dir, str(root / "hub"), "double_seq_bn", num_labels=3, seed=7, scale=0.1)
    want = adapterhub_logits(minilm_dir, path, SENTENCES).softmax(-1)
    data_dir = str(tmp_path / "data")
    answers = []
    for _ in range(2):
        proc = ServerProcess("--data-dir", data_dir, "--adapter-root", str(root), "--no-examples")
        try:
            with grpc.insecure_channel(proc.address) as ch:
                reg = pb_grpc.AdapterRegistryStub(ch)
                if not answers:
                    reg.RegisterAdapter(pb.RegisterAdapterRequest(task="hub", path="hub"))
                assert reg.GetAdapter(pb.GetAdapterRequest(task="hub")).peft_type == "BOTTLENECK"
                answers.append(pb_grpc.ClassifierStub(ch).Classify(pb.ClassifyRequest(task="hub", texts=SENTENCES)))
        finally:
            assert proc.stop() == 0
    for response in answers:
        for pred, row in zip(response.predictions, want):
            got = {s.label: s.score for s in pred.scores}
            assert max(abs(got[f"LABEL_{i}"] - row[i].item()) for i in range(3)) <= 1e-4
