"""The Open Inference Protocol (KServe v2) against a real server: NVIDIA's tritonclient over gRPC and HTTP
(in its own process, see tritonclient_checks.py), plain HTTP requests for every REST endpoint, typed and
raw BYTES over gRPC with the server's stubs, and the same answers as the native Classify."""
import base64
import http.client as http_client
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest

from adapterserve.loadtest.server_proc import ServerProcess, free_port
from adapterserve.runtime.server.stubs import pb, pb_grpc
from adapterserve.v1 import inference_pb2 as ip
from adapterserve.v1 import inference_pb2_grpc as ip_grpc

TOKEN = "oip-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def server(minilm_adapters, tmp_path_factory):
    root, _ = minilm_adapters
    proc = ServerProcess("--data-dir", str(tmp_path_factory.mktemp("data")), "--adapter-root", root,
                         "--admin-token", TOKEN, "--max-texts-per-request", "64", "--max-adapter-bytes", str(4 << 20),
                         http_port=free_port(),
                         metrics_port=free_port())
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.address) as ch:
        yield ch


def http(server, method, path, body=None, headers=None, raw=None):
    """(status, headers, parsed JSON or raw bytes)."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(server.http_url + path, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, head, content = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        status, head, content = e.code, dict(e.headers), e.read()
    if head.get("content-type", "").startswith("application/json") and content:
        return status, head, json.loads(content)
    return status, head, content


def text_tensor(texts, name="TEXT"):
    return {"name": name, "datatype": "BYTES", "shape": [len(texts)], "data": texts}


def native(channel, task, texts):
    response = pb_grpc.ClassifierStub(channel).Classify(pb.ClassifyRequest(task=task, texts=texts))
    return response


# ---- tritonclient -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["grpc", "http"])
def test_tritonclient(server, channel, mode, minilm_adapters):
    address = server.address if mode == "grpc" else server.http_url.removeprefix("http://")
    upload = os.path.join(os.path.dirname(os.path.dirname(HERE)), "adapters", "examples", "sst2")
    done = subprocess.run([sys.executable, os.path.join(HERE, "tritonclient_checks.py"), mode, address, TOKEN, upload],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout)
    assert seen["live"] and seen["ready"] and seen["server"]["name"] == "adapterserve"
    assert "model_repository" in seen["server"]["extensions"]
    for task, c in (("sst2", 2), ("ag_news", 4)):
        model = seen["models"][task]
        assert model["ready"] and len(model["labels"]) == c
        assert model["inputs"][0] == ["TEXT", "BYTES", [-1]]
        assert ["SCORES", "FP32", [-1, c]] in model["outputs"] and ["LOGITS", "FP32", [-1, c]] in model["outputs"]
        # The parallel runs agree with each other and with the native Classify on the same texts.
        runs = seen["parallel"][task]
        reference = native(channel, task, seen["texts"][task])
        for run in runs:
            assert run["label"] == [p.scores[0].label for p in reference.predictions]
            scores = np.array(run["scores"])
            assert scores.shape == (len(reference.predictions), c)
            for row, p in zip(scores, reference.predictions):
                by_index = {s.index: s.score for s in p.scores}
                np.testing.assert_allclose(row, [by_index[i] for i in range(c)], atol=1e-5)
            np.testing.assert_allclose(np.exp(run["logits"]) / np.exp(run["logits"]).sum(1, keepdims=True), scores,
                                       atol=1e-5)
    assert seen["selected"]["names"] == ["LABEL", "SCORES"]
    label, top2 = seen["selected"]["label"], seen["selected"]["classification"]
    assert len(top2) == 4 and top2[0].endswith(":" + label[0]) and top2[2].endswith(":" + label[1])
    unauth = seen["load_without_token"]
    assert unauth["status"] in ("StatusCode.UNAUTHENTICATED", "401") and "authorization" in unauth["message"]
    assert seen["load"]["status"] == "OK" and seen["uploaded_labels"][0] in ("neg", "pos")
    assert ["uploaded", "READY"] in seen["index"]
    assert seen["unload"]["status"] == "OK"
    not_found = ("StatusCode.NOT_FOUND", "404")
    bad = ("StatusCode.INVALID_ARGUMENT", "400")
    assert seen["after_unload"]["status"] in not_found and "uploaded" in seen["after_unload"]["message"]
    assert seen["unknown_model"]["status"] in not_found and "no-such-task" in seen["unknown_model"]["message"]
    assert seen["empty_input"]["status"] in bad and "1 or more" in seen["empty_input"]["message"]
    assert seen["wrong_datatype"]["status"] in bad and "must be BYTES" in seen["wrong_datatype"]["message"]
    assert seen["wrong_shape"]["status"] in bad and "[N] or [N, 1]" in seen["wrong_shape"]["message"]
    assert seen["wrong_input_name"]["status"] in bad and "TEXT" in seen["wrong_input_name"]["message"]


# ---- gRPC with the server's stubs: typed and raw BYTES, versions, streams ------------------------------


def test_grpc_typed_and_raw_bytes_give_the_native_answers(channel):
    stub = ip_grpc.GRPCInferenceServiceStub(channel)
    texts = ["a charming, moving film", "dull and slow"]
    typed = ip.ModelInferRequest(model_name="sst2", id="typed")
    typed.inputs.add(name="TEXT", datatype="BYTES", shape=[2]).contents.bytes_contents.extend(t.encode() for t in texts)
    raw = ip.ModelInferRequest(model_name="sst2", id="raw")
    raw.inputs.add(name="TEXT", datatype="BYTES", shape=[2, 1])
    raw.raw_input_contents.append(b"".join(len(t.encode()).to_bytes(4, "little") + t.encode() for t in texts))
    reference = native(channel, "sst2", texts)
    for request in (typed, raw):
        response = stub.ModelInfer(request)
        assert response.id == request.id and response.model_version == reference.adapter_version
        names = [o.name for o in response.outputs]
        assert names == ["LABEL", "SCORES", "LOGITS"]
        scores = np.frombuffer(response.raw_output_contents[1], dtype="<f4").reshape(2, 2)
        for row, p in zip(scores, reference.predictions):
            by_index = {s.index: s.score for s in p.scores}
            np.testing.assert_allclose(row, [by_index[0], by_index[1]], atol=1e-5)
        label_raw = response.raw_output_contents[0]
        first = int.from_bytes(label_raw[:4], "little")
        assert label_raw[4:4 + first].decode() == reference.predictions[0].scores[0].label


def test_grpc_stale_version_names_the_current_one(channel):
    stub = ip_grpc.GRPCInferenceServiceStub(channel)
    current = stub.ModelMetadata(ip.ModelMetadataRequest(name="sst2")).versions[0]
    request = ip.ModelInferRequest(model_name="sst2", model_version="0" * 64)
    request.inputs.add(name="TEXT", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"fine")
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(request)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and current[:12] in e.value.details()
    request.model_version = current[:12]  # a prefix as listings show it is accepted
    assert stub.ModelInfer(request).model_version == current


def test_grpc_stream_answers_in_order_and_reports_errors_in_stream(channel):
    stub = ip_grpc.GRPCInferenceServiceStub(channel)

    def requests():
        for i, task in enumerate(["sst2", "ag_news", "nope", "sst2"]):
            r = ip.ModelInferRequest(model_name=task, id=str(i))
            r.inputs.add(name="TEXT", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"some text")
            yield r

    answers = list(stub.ModelStreamInfer(requests()))
    assert [a.infer_response.id for a in answers] == ["0", "1", "", "3"]
    assert "nope" in answers[2].error_message
    assert answers[1].infer_response.outputs[1].shape == [1, 4]


def test_grpc_health_and_reflection_list_the_service(channel):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(channel)
    status = health.Check(health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService")).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    answer = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    assert "inference.GRPCInferenceService" in [s.name for s in answer.list_services_response.service]


# ---- HTTP/REST, every endpoint ----------------------------------------------------------------------------


def test_http_health_and_metadata(server):
    assert http(server, "GET", "/v2/health/live")[0] == 200
    assert http(server, "GET", "/v2/health/ready")[0] == 200
    status, _, meta = http(server, "GET", "/v2")
    assert status == 200 and meta["name"] == "adapterserve" and "binary_tensor_data" in meta["extensions"]
    status, _, model = http(server, "GET", "/v2/models/ag_news")
    assert status == 200 and model["outputs"][1] == {"name": "SCORES", "datatype": "FP32", "shape": [-1, 4]}
    version = model["versions"][0]
    assert http(server, "GET", f"/v2/models/ag_news/versions/{version}")[2]["name"] == "ag_news"
    assert http(server, "GET", "/v2/models/ag_news/ready")[0] == 200
    assert http(server, "GET", f"/v2/models/ag_news/versions/{version}/ready")[0] == 200
    status, _, config = http(server, "GET", "/v2/models/ag_news/config")
    assert status == 200 and json.loads(config["parameters"]["labels"]["string_value"]) == [
        "world", "sports", "business", "sci_tech"]
    status, _, err = http(server, "GET", "/v2/models/nope")
    assert status == 404 and "nope" in err["error"]
    status, _, err = http(server, "GET", "/v2/models/ag_news/versions/abc/ready")
    assert status == 404 and version[:12] in err["error"]


def test_http_infer_json_matches_native(server, channel):
    texts = ["Stocks fell as oil prices rose", "The match went to extra time"]
    status, _, answer = http(server, "POST", "/v2/models/ag_news/infer",
                             {"id": "r1", "inputs": [text_tensor(texts)], "parameters": {"top_k": 2}})
    assert status == 200 and answer["id"] == "r1"
    reference = native(channel, "ag_news", texts)
    outputs = {o["name"]: o for o in answer["outputs"]}
    assert outputs["LABEL"]["shape"] == [2, 2]
    assert outputs["LABEL"]["data"] == [s.label for p in reference.predictions for s in p.scores[:2]]
    scores = np.array(outputs["SCORES"]["data"]).reshape(outputs["SCORES"]["shape"])
    for row, p in zip(scores, reference.predictions):
        by_index = {s.index: s.score for s in p.scores}
        np.testing.assert_allclose(row, [by_index[i] for i in range(4)], atol=1e-5)
    assert answer["model_version"] == reference.adapter_version


def test_http_outputs_selection_pairs_and_binary(server):
    body = {"inputs": [text_tensor(["a man sleeps"]), text_tensor(["a person rests"], "TEXT_PAIR")],
            "outputs": [{"name": "LOGITS", "parameters": {"binary_data": True}}]}
    status, head, content = http(server, "POST", "/v2/models/sst2/infer", body)
    assert status == 200
    n = int(head["inference-header-content-length"])
    header = json.loads(content[:n])
    assert [o["name"] for o in header["outputs"]] == ["LOGITS"]
    assert header["outputs"][0]["parameters"]["binary_data_size"] == 8 == len(content) - n
    # Binary input: the JSON header, then the length-prefixed texts.
    texts = [b"dull and slow", b"a delight"]
    blob = b"".join(len(t).to_bytes(4, "little") + t for t in texts)
    header = json.dumps({"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [2],
                                     "parameters": {"binary_data_size": len(blob)}}],
                         "outputs": [{"name": "LABEL"}]}).encode()
    status, _, answer = http(server, "POST", "/v2/models/sst2/infer", raw=header + blob,
                             headers={"Inference-Header-Content-Length": str(len(header))})
    assert status == 200 and answer["outputs"][0]["shape"] == [2]


@pytest.mark.parametrize("body,needle", [
    ({"inputs": [text_tensor([])]}, "1 or more"),
    ({"inputs": [{"name": "TEXT", "datatype": "INT64", "shape": [1], "data": [1]}]}, "must be BYTES"),
    ({"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [2], "data": ["one"]}]}, "carries 1 elements"),
    ({"inputs": [text_tensor(["x"], "IDS")]}, "unknown input IDS"),
    ({"inputs": [text_tensor(["x"])], "outputs": [{"name": "PROBS"}]}, "unknown output 'PROBS'"),
    ({"inputs": [text_tensor(["x"])], "parameters": {"top_k": -1}}, "top_k"),
    ({"inputs": [text_tensor(["x " * 2000])]}, "truncate"),
    ({"nothing": 1}, "inputs must be a list"),
])
def test_http_bad_input_is_400_with_what_to_change(server, body, needle):
    status, _, err = http(server, "POST", "/v2/models/sst2/infer", body)
    assert status == 400 and needle in err["error"], err
    assert http(server, "POST", "/v2/models/sst2/infer", {"inputs": [text_tensor(["still served"])]})[0] == 200


def test_http_limits_and_deadlines_are_the_native_ones(server):
    status, _, err = http(server, "POST", "/v2/models/sst2/infer", {"inputs": [text_tensor(["x"] * 65)]})
    assert status == 400 and "the limit is 64" in err["error"]
    status, _, err = http(server, "POST", "/v2/models/sst2/infer",
                          {"inputs": [text_tensor(["x"])], "parameters": {"timeout": 1}})  # 1 µs, Triton's unit
    assert status == 504 and "deadline" in err["error"]
    # A body over the limit is refused from its Content-Length, before it is sent (read).
    connection = http_client.HTTPConnection(server.http_url.removeprefix("http://"), timeout=30)
    connection.putrequest("POST", "/v2/models/sst2/infer")
    connection.putheader("Content-Length", str(10 << 20))
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413 and "limit" in json.loads(response.read())["error"]
    connection.close()


def test_http_not_json_and_truncate_parameter(server):
    status, _, err = http(server, "POST", "/v2/models/sst2/infer", raw=b"{not json")
    assert status == 400 and "not JSON" in err["error"]
    status, _, answer = http(server, "POST", "/v2/models/sst2/infer",
                             {"inputs": [text_tensor(["x " * 2000])], "parameters": {"truncate": True}})
    assert status == 200


def test_http_repository_needs_the_admin_token(server):
    status, head, err = http(server, "POST", "/v2/repository/index", {})
    assert status == 401 and "authorization" in err["error"] and head.get("www-authenticate") == "Bearer"
    status, _, err = http(server, "POST", "/v2/repository/models/x/load", {}, headers={"Authorization": "Bearer wrong"})
    assert status == 401 and "wrong" in err["error"]
    status, _, err = http(server, "POST", "/v2/repository/models/x/unload", {})
    assert status == 401


def test_http_repository_load_by_name_path_and_upload_then_unload(server, minilm_adapters):
    root, paths = minilm_adapters
    # By name: the directory of that name under --adapter-root (Triton's model repository).
    assert http(server, "POST", "/v2/repository/models/gamma/load", {}, headers=AUTH)[0] == 200
    status, _, model = http(server, "GET", "/v2/models/gamma")
    assert status == 200 and model["outputs"][1]["shape"] == [-1, 5]
    # By path, replacing: the version changes.
    status, _, _ = http(server, "POST", "/v2/repository/models/gamma/load",
                        {"parameters": {"path": "beta"}}, headers=AUTH)
    assert status == 200 and http(server, "GET", "/v2/models/gamma")[2]["outputs"][1]["shape"] == [-1, 3]
    # Upload (base64 files, as tritonclient's HTTP load_model sends them).
    files = {f"file:{name}": base64.b64encode(open(os.path.join(paths["alpha"], name), "rb").read()).decode()
             for name in ("adapter_config.json", "adapter_model.safetensors")}
    status, _, _ = http(server, "POST", "/v2/repository/models/uploaded/load",
                        {"parameters": {**files, "labels": '["no", "yes"]'}}, headers=AUTH)
    assert status == 200
    answer = http(server, "POST", "/v2/models/uploaded/infer", {"inputs": [text_tensor(["hello"])]})[2]
    assert answer["outputs"][0]["data"][0] in ("no", "yes")
    status, _, index = http(server, "POST", "/v2/repository/index", {}, headers=AUTH)
    states = {m["name"]: m["state"] for m in index}
    assert states["gamma"] == states["uploaded"] == "READY" and states["beta2"] == "UNAVAILABLE"
    ready = http(server, "POST", "/v2/repository/index", {"ready": True}, headers=AUTH)[2]
    assert "beta2" not in {m["name"] for m in ready}
    for task in ("gamma", "uploaded"):
        assert http(server, "POST", f"/v2/repository/models/{task}/unload", {}, headers=AUTH)[0] == 200
    assert http(server, "GET", "/v2/models/gamma")[0] == 404
    status, _, err = http(server, "POST", "/v2/repository/models/gamma/unload", {}, headers=AUTH)
    assert status == 404
    status, _, err = http(server, "POST", "/v2/repository/models/missing-dir/load", {}, headers=AUTH)
    assert status == 400 and "--adapter-root has no directory" in err["error"]
    status, _, err = http(server, "POST", "/v2/repository/models/x/load",
                          {"parameters": {"file:adapter_config.json": "!!"}}, headers=AUTH)
    assert status == 400 and "base64" in err["error"]


def test_http_statistics_count_requests(server):
    before = http(server, "GET", "/v2/models/sst2/stats")[2]["model_stats"][0]
    http(server, "POST", "/v2/models/sst2/infer", {"inputs": [text_tensor(["one", "two", "three"])]})
    after = http(server, "GET", "/v2/models/sst2/stats")[2]["model_stats"][0]
    assert after["inference_count"] == before["inference_count"] + 3
    assert after["execution_count"] == before["execution_count"] + 1
    assert after["inference_stats"]["success"]["ns"] > before["inference_stats"]["success"]["ns"]
    every = http(server, "GET", "/v2/models/stats")[2]["model_stats"]
    assert {"sst2", "ag_news"} <= {m["name"] for m in every}


def test_oip_calls_count_in_the_same_metrics(server, channel):
    http(server, "POST", "/v2/models/sst2/infer", {"inputs": [text_tensor(["counted"])]})
    http(server, "POST", "/v2/models/sst2/infer", {"inputs": [text_tensor([])]})
    request = ip.ModelInferRequest(model_name="sst2")
    request.inputs.add(name="TEXT", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"counted")
    ip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    with urllib.request.urlopen(urllib.request.Request(server.metrics_url, headers=AUTH), timeout=30) as r:
        text = r.read().decode()
    assert 'adapterserve_requests_total{code="OK",rpc="http:ModelInfer"}' in text
    assert 'adapterserve_requests_total{code="INVALID_ARGUMENT",rpc="http:ModelInfer"}' in text
    assert 'adapterserve_requests_total{code="OK",rpc="ModelInfer"}' in text
    assert 'adapterserve_task_texts_total{task="sst2"}' in text


def test_grpc_config_and_statistics_are_the_http_ones(server, channel):
    stub = ip_grpc.GRPCInferenceServiceStub(channel)
    config = stub.ModelConfig(ip.ModelConfigRequest(name="ag_news")).config
    assert [o.name for o in config.output] == ["LABEL", "SCORES", "LOGITS"] and list(config.output[1].dims) == [-1, 4]
    assert config.input[1].optional and config.input[0].data_type == ip.TYPE_STRING
    http_config = http(server, "GET", "/v2/models/ag_news/config")[2]
    assert config.parameters["labels"].string_value == http_config["parameters"]["labels"]["string_value"]
    grpc_stats = stub.ModelStatistics(ip.ModelStatisticsRequest(name="sst2")).model_stats[0]
    http_stats = http(server, "GET", "/v2/models/sst2/stats")[2]["model_stats"][0]
    assert grpc_stats.inference_count == http_stats["inference_count"] > 0
    assert grpc_stats.inference_stats.success.count == http_stats["inference_stats"]["success"]["count"]


def test_adapterhub_uploads_over_oip_http_and_native_grpc(server, channel, minilm_dir, tmp_path):
    """An AdapterHub directory uploaded as `file:` parameters (OIP HTTP) and as AdapterFiles.other_files
    (native gRPC, through the client library) answers as the `adapters` library does; a file name it
    does not take is refused with the names it does."""
    from adapterserve.client import Client
    from tiny_models import adapterhub_logits, make_adapterhub_bottleneck

    path = make_adapterhub_bottleneck(minilm_dir, str(tmp_path / "hub"), "seq_bn", num_labels=3, seed=11, scale=0.1)
    texts = ["a gorgeous , witty , seductive movie .", "Oil prices rise as OPEC cuts output"]
    want = adapterhub_logits(minilm_dir, path, texts).softmax(-1)
    files = {f"file:{name}": base64.b64encode(open(os.path.join(path, name), "rb").read()).decode()
             for name in os.listdir(path)}
    assert http(server, "POST", "/v2/repository/models/hub_http/load", {"parameters": files}, headers=AUTH)[0] == 200
    client = Client(server.address, token=TOKEN)
    assert client.register_dir("hub_grpc", path).peft_type == "BOTTLENECK"
    for task in ("hub_http", "hub_grpc"):
        answer = native(channel, task, texts)
        for pred, row in zip(answer.predictions, want):
            got = {s.label: s.score for s in pred.scores}
            assert max(abs(got[f"LABEL_{i}"] - row[i].item()) for i in range(3)) <= 1e-4
    bad = pb.AdapterFiles(adapter_config=b"{}", other_files={"pytorch_adapter.bin": b"x"})
    with pytest.raises(grpc.RpcError) as info:
        pb_grpc.AdapterRegistryStub(channel).RegisterAdapter(pb.RegisterAdapterRequest(task="bad", files=bad),
                                                             metadata=[("authorization", f"Bearer {TOKEN}")])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "adapter.safetensors" in info.value.details()
