"""The naive peer: a gRPC server that does what a user of plain PEFT would do.

All adapters loaded into PeftModels (one model per label count, since a PEFT classification head has
one size), `set_adapter(task)` per request, one request per forward, same wire contract as
adapterserve's Classifier.Classify so the same load generator drives both.

    python -m adapterserve.loadtest.baselines.peft_server --port 50061 --adapters DIR   # DIR/<task>/ PEFT dirs
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading

import grpc
import torch


class PeftServicer:
    def __init__(self, base_dir: str, adapter_root: str, precision: str = "fp32") -> None:
        from peft import PeftModel
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(base_dir)
        self.models: dict[int, PeftModel] = {}
        self.model_of: dict[str, PeftModel] = {}
        self.labels: dict[str, list[str]] = {}
        self.lock = threading.Lock()
        for task in sorted(os.listdir(adapter_root)):
            path = os.path.join(adapter_root, task)
            labels = json.load(open(os.path.join(path, "labels.json")))
            n = len(labels)
            if n not in self.models:
                base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=n)
                if precision == "bf16":  # the same bf16 base our --precision bf16 serves on a CPU
                    from adapterserve.runtime.engine.base_model import bf16_weights_fp32_activations

                    bf16_weights_fp32_activations(base.base_model)
                self.models[n] = PeftModel.from_pretrained(base, path, adapter_name=task).eval()
            else:
                self.models[n].load_adapter(path, adapter_name=task)
            self.model_of[task] = self.models[n]
            self.labels[task] = labels

    def classify(self, task: str, texts: list[str]):
        model = self.model_of[task]
        with self.lock, torch.inference_mode():  # one request per forward
            model.set_adapter(task)
            enc = self.tokenizer(texts, padding=True, truncation=True, max_length=512, return_tensors="pt")
            return torch.softmax(model(**enc).logits, dim=-1)


async def serve(args) -> None:
    from adapterserve.runtime.config import packaged_base_model_dir
    from adapterserve.runtime.server.stubs import pb, pb_grpc

    servicer = PeftServicer(args.base_model or packaged_base_model_dir(), args.adapters, args.precision)
    loop = asyncio.get_running_loop()

    class Classifier(pb_grpc.ClassifierServicer):
        async def Classify(self, request, context):
            if request.task not in servicer.model_of:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown task {request.task}")
            probs = await loop.run_in_executor(None, servicer.classify, request.task, list(request.texts))
            labels = servicer.labels[request.task]
            preds = []
            for row in probs.tolist():
                order = sorted(range(len(row)), key=lambda k: -row[k])
                preds.append(pb.Prediction(scores=[pb.LabelScore(label=labels[k], index=k, score=row[k]) for k in order]))
            return pb.ClassifyResponse(request_id=request.request_id, task=request.task, predictions=preds)

    class Registry(pb_grpc.AdapterRegistryServicer):
        async def ListAdapters(self, request, context):
            return pb.ListAdaptersResponse(adapters=[pb.Adapter(task=t) for t in sorted(servicer.model_of)])

    server = grpc.aio.server()
    pb_grpc.add_ClassifierServicer_to_server(Classifier(), server)
    pb_grpc.add_AdapterRegistryServicer_to_server(Registry(), server)
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    await server.start()
    print(f"peft baseline listening on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=50061)
    p.add_argument("--adapters", required=True, help="directory of PEFT adapter dirs, one per task")
    p.add_argument("--base-model", default=None)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: bf16 linear weights with fp32 activations, like adapterserve's CPU bf16")
    asyncio.run(serve(p.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
