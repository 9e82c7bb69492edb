"""Fuzzed uploads over gRPC while a bystander classifies, against the real server: 300 generated
configs, label files and safetensors bodies; every answer is OK or a non-INTERNAL status, the
bystander never sees an error, and the server log holds no traceback."""
import json
import threading

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapterserve.runtime.server.stubs import pb, pb_grpc
from conftest import AUTH, read_files

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats() | st.text(max_size=12),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=10)


def test_fuzzed_uploads_never_internal_and_others_are_served(server, minilm_adapters):
    _, paths = minilm_adapters
    good = read_files(paths["alpha"])
    codes, bystander_errors = [], []
    stop = threading.Event()

    def bystander():
        with grpc.insecure_channel(server.address) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            while not stop.is_set():
                try:
                    stub.Classify(pb.ClassifyRequest(task="sst2", texts=["a charming film"]), timeout=30)
                except grpc.RpcError as e:
                    bystander_errors.append(e.code())

    channel = grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 32 << 20)])
    registry = pb_grpc.AdapterRegistryStub(channel)

    @settings(max_examples=300, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    @given(config_edits=st.dictionaries(st.sampled_from(["r", "lora_alpha", "peft_type", "use_rslora", "rank_pattern"]),
                                        json_values, max_size=3),
           labels=st.none() | json_values, weights=st.none() | st.binary(max_size=64),
           metadata=st.dictionaries(st.text(max_size=20), st.text(max_size=40), max_size=3))
    def upload(config_edits, labels, weights, metadata):
        config = json.loads(good.adapter_config)
        config.update(config_edits)
        files = pb.AdapterFiles(adapter_config=json.dumps(config).encode(),
                                adapter_weights=good.adapter_weights if weights is None else weights,
                                labels_json=good.labels_json if labels is None else json.dumps(labels).encode())
        try:
            registry.RegisterAdapter(pb.RegisterAdapterRequest(task="fuzz", files=files, replace=True,
                                                               metadata=metadata), metadata=AUTH, timeout=60)
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as e:
            codes.append(e.code())

    t = threading.Thread(target=bystander)
    t.start()
    try:
        upload()
    finally:
        stop.set()
        t.join()
        channel.close()
    assert len(codes) >= 300
    assert grpc.StatusCode.INTERNAL not in codes and grpc.StatusCode.UNKNOWN not in codes, codes
    assert grpc.StatusCode.INVALID_ARGUMENT in codes
    assert not bystander_errors, bystander_errors[:5]
    assert "Traceback" not in server.log()
