"""Drive a running adapterserve with NVIDIA's own client library (tritonclient) and print what it saw as
JSON. Run as a separate process by test_oip.py: tritonclient's generated module registers the protobuf
package `inference`, as the server's does, and protobuf refuses the same symbols twice in one process
(a user's client process never imports the server, so this is how they meet too).

usage: python tritonclient_checks.py grpc|http ADDRESS TOKEN UPLOAD_DIR
"""
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

MODE, ADDRESS, TOKEN, UPLOAD_DIR = sys.argv[1:5]
AUTH = {"authorization": f"Bearer {TOKEN}"}
TEXTS = {"sst2": ["a charming, moving film", "dull and slow", "I loved every minute"],
         "ag_news": ["Stocks fell as oil prices rose", "The match went to extra time"]}

if MODE == "grpc":
    import tritonclient.grpc as tc
else:
    import tritonclient.http as tc
from tritonclient.utils import InferenceServerException


def text_input(texts, name="TEXT", datatype="BYTES", shape=None, binary=True):
    tensor = tc.InferInput(name, shape or [len(texts)], datatype)
    if datatype == "BYTES":
        data = np.array([t.encode() for t in texts], dtype=object).reshape(shape or [len(texts)])
    else:
        data = np.zeros(shape or [len(texts)], dtype=np.float32)
    if MODE == "http":
        tensor.set_data_from_numpy(data, binary_data=binary)
    else:
        tensor.set_data_from_numpy(data)
    return tensor


def error_of(fn):
    try:
        fn()
    except InferenceServerException as e:
        return {"status": str(e.status()), "message": e.message()}
    return {"status": "OK", "message": ""}


def main():
    client = tc.InferenceServerClient(ADDRESS)
    out = {"texts": TEXTS}
    out["live"], out["ready"] = client.is_server_live(), client.is_server_ready()
    meta = client.get_server_metadata()
    out["server"] = meta if MODE == "http" else {"name": meta.name, "extensions": list(meta.extensions)}
    models = {}
    for task in TEXTS:
        m = client.get_model_metadata(task)
        c = client.get_model_config(task)
        if MODE == "grpc":
            m = {"versions": list(m.versions), "inputs": [(t.name, t.datatype, list(t.shape)) for t in m.inputs],
                 "outputs": [(t.name, t.datatype, list(t.shape)) for t in m.outputs]}
            labels = json.loads(c.config.parameters["labels"].string_value)
        else:
            m = {"versions": m["versions"], "inputs": [(t["name"], t["datatype"], t["shape"]) for t in m["inputs"]],
                 "outputs": [(t["name"], t["datatype"], t["shape"]) for t in m["outputs"]]}
            labels = json.loads(c["parameters"]["labels"]["string_value"])
        models[task] = {**m, "labels": labels, "ready": client.is_model_ready(task)}
    out["models"] = models

    # Two tasks with different label counts, in parallel (each thread its own client).
    def infer(task):
        own = tc.InferenceServerClient(ADDRESS)
        result = own.infer(task, [text_input(TEXTS[task])])
        return {"label": [x.decode() for x in result.as_numpy("LABEL").reshape(-1)],
                "scores": result.as_numpy("SCORES").tolist(), "logits": result.as_numpy("LOGITS").tolist()}

    with ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(infer, ["sst2", "ag_news"] * 4))
    out["parallel"] = {"sst2": runs[0::2], "ag_news": runs[1::2]}

    selected = client.infer("ag_news", [text_input(TEXTS["ag_news"], binary=False)],
                            outputs=[tc.InferRequestedOutput("LABEL"),
                                     tc.InferRequestedOutput("SCORES", class_count=2)])
    response = selected.get_response(as_json=True) if MODE == "grpc" else selected.get_response()
    out["selected"] = {"names": sorted(o["name"] for o in response["outputs"]),
                       "label": [x.decode() for x in selected.as_numpy("LABEL").reshape(-1)],
                       "classification": [x.decode() for x in selected.as_numpy("SCORES").reshape(-1)]}

    # Repository: load an uploaded adapter under a new name, infer, unload.
    files = {f"file:{name}": open(os.path.join(UPLOAD_DIR, name), "rb").read()
             for name in ("adapter_config.json", "adapter_model.safetensors", "labels.json")}
    config = json.dumps({"parameters": {"labels": {"string_value": json.dumps(["neg", "pos"])}}})
    out["load_without_token"] = error_of(lambda: client.load_model("uploaded", config=config, files=files))
    out["load"] = error_of(lambda: client.load_model("uploaded", headers=AUTH, config=config, files=files))
    out["uploaded_labels"] = [x.decode() for x in client.infer("uploaded", [text_input(["fine"])]).as_numpy("LABEL")]
    index = client.get_model_repository_index(headers=AUTH)
    out["index"] = sorted((m.name, m.state) for m in index.models) if MODE == "grpc" else \
        sorted((m["name"], m["state"]) for m in index)
    out["unload"] = error_of(lambda: client.unload_model("uploaded", headers=AUTH))
    out["after_unload"] = error_of(lambda: client.infer("uploaded", [text_input(["fine"])]))

    out["unknown_model"] = error_of(lambda: client.infer("no-such-task", [text_input(["x"])]))
    out["empty_input"] = error_of(lambda: client.infer("sst2", [text_input([], shape=[0])]))
    out["wrong_datatype"] = error_of(lambda: client.infer("sst2", [text_input(["x"], datatype="FP32")]))
    out["wrong_shape"] = error_of(lambda: client.infer("sst2", [text_input(["a", "b"], shape=[1, 2])]))
    out["wrong_input_name"] = error_of(lambda: client.infer("sst2", [text_input(["x"], name="INPUT_IDS")]))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
