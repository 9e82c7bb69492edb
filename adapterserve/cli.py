"""The `adapterserve` command.

    adapterserve serve [flags]                  the gRPC server (every flag: adapterserve serve --help)
    adapterserve cluster --replicas N [flags]   the same API on Ray Serve replicas (the [ray] extra)
    adapterserve classify TASK TEXT...          a client call; also register, unregister, list, info
    adapterserve train | evaluate | export | loadtest | bench ...   the tools (each has --help)
    adapterserve build-kernels                  compile the native kernels into the kernel cache
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

from adapterserve import __version__

DEFAULT_ADDRESS = "127.0.0.1:50051"

# Tools with their own argument parsers: everything after the subcommand is theirs.
_TOOLS = {
    "train": ("adapterserve.adapters.train", "train a LoRA adapter on a CSV/TSV (needs the [train] extra)"),
    "evaluate": ("adapterserve.adapters.evaluate", "accuracy, F1 and more of an adapter on labelled data"),
    "export": ("adapterserve.exporters.__main__", "ONNX export: one task merged, or the shared-base graph"),
    "loadtest": ("adapterserve.loadtest.__main__", "load a server, compare runs, run the benchmark matrix"),
    "cluster": ("adapterserve.runtime.cluster.app", "serve on Ray Serve: replicas, adapter-affinity routing, one registry "
                "(needs the [ray] extra; every serve flag plus --replicas, --autoscale, ...)"),
    "bench": ("adapterserve.loadtest.host_bench", "bench host: the per-batch host work, forward replaced by recorded features"),
}


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=os.environ.get("ADAPTERSERVE_ADDRESS", DEFAULT_ADDRESS),
                   help=f"server HOST:PORT [env ADAPTERSERVE_ADDRESS] (default: {DEFAULT_ADDRESS})")
    p.add_argument("--token", default=os.environ.get("ADAPTERSERVE_TOKEN"),
                   help="bearer token: the server's --admin-token for registry calls, --classify-token for classify "
                        "[env ADAPTERSERVE_TOKEN]")
    p.add_argument("--tls-ca", default=None, metavar="PEM", help="CA certificate: connect with TLS")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per call")


def _parser() -> argparse.ArgumentParser:
    from adapterserve.runtime.server.settings import add_serve_args

    p = argparse.ArgumentParser(prog="adapterserve", description="Serve many task adapters on one frozen encoder.",
                                allow_abbrev=False)
    p.add_argument("--version", action="version", version=f"adapterserve {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_serve_args(sub.add_parser("serve", help="start the gRPC server", allow_abbrev=False))

    c = sub.add_parser("classify", help="classify texts with a task", allow_abbrev=False,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    c.add_argument("task")
    c.add_argument("texts", nargs="+", metavar="TEXT")
    c.add_argument("--top-k", type=int, default=1, help="labels per text (0 = all)")
    c.add_argument("--json", action="store_true", help="one JSON object on stdout")
    _client_args(c)

    r = sub.add_parser("register", help="register an adapter directory under a task name", allow_abbrev=False,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    r.add_argument("task")
    r.add_argument("directory", help="local PEFT directory to upload (with --path: a directory on the server)")
    r.add_argument("--path", action="store_true", help="the directory is on the server, under its --adapter-root")
    r.add_argument("--replace", action="store_true", help="swap an existing task atomically")
    r.add_argument("--labels", default=None, help="comma-separated label names (overrides labels.json)")
    _client_args(r)

    u = sub.add_parser("unregister", help="remove a task", allow_abbrev=False)
    u.add_argument("task")
    _client_args(u)
    for name, help_ in (("list", "list registered tasks"), ("info", "the server's base, engine, paths and hardware")):
        _client_args(sub.add_parser(name, help=help_, allow_abbrev=False))
    b = sub.add_parser("build-kernels", help="compile the native kernels into the kernel cache (for images "
                       "that serve without a compiler)", allow_abbrev=False)
    b.add_argument("--kernel-dir", default=None, help="where to put them (default: ADAPTERSERVE_KERNEL_DIR, "
                   "else the cache's kernels/); serve with ADAPTERSERVE_KERNEL_DIR set to the same")
    for name, (_, help_) in _TOOLS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return p


def _adapter_json(a) -> dict:
    return {"task": a.task, "version": a.version, "peft_type": a.peft_type, "rank": a.rank,
            "labels": list(a.labels), "size_bytes": a.size_bytes}


def _client_command(args) -> int:
    import grpc

    from adapterserve.client import Client

    try:
        with Client(args.address, args.token, args.tls_ca, args.timeout) as client:
            if args.command == "classify":
                response = client.classify(args.task, args.texts, top_k=args.top_k)
                if args.json:
                    print(json.dumps({"task": response.task, "adapter_version": response.adapter_version,
                                      "predictions": [[{"label": s.label, "score": s.score} for s in p.scores]
                                                      for p in response.predictions]}))
                else:
                    for text, p in zip(args.texts, response.predictions):
                        print(text)
                        for s in p.scores:
                            print(f"  {s.label}\t{s.score:.4f}")
            elif args.command == "register":
                labels = args.labels.split(",") if args.labels else None
                register = client.register_path if args.path else client.register_dir
                a = register(args.task, args.directory, replace=args.replace, labels=labels)
                print(f"registered {a.task} version {a.version[:12]} ({a.peft_type}, rank {a.rank}, "
                      f"{len(a.labels)} labels)")
            elif args.command == "unregister":
                a = client.unregister(args.task)
                print(f"unregistered {a.task} (version {a.version[:12]})")
            elif args.command == "list":
                for a in client.list():
                    print(f"{a.task}\t{a.version[:12]}\t{a.peft_type}\tr={a.rank}\t{len(a.labels)} labels")
            elif args.command == "info":
                info = client.info()
                print(json.dumps({"version": info.version, "base_model": info.base_model, "engine": info.engine,
                                  "precision": info.precision, "device": info.device, "paths": dict(info.paths),
                                  "hardware": info.hardware, "registered_adapters": info.registered_adapters},
                                 indent=2))
    except grpc.RpcError as e:
        print(f"adapterserve {args.command}: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"adapterserve {args.command}: {e}", file=sys.stderr)
        return 1
    return 0


def _build_kernels(args) -> int:
    if args.kernel_dir:
        os.environ["ADAPTERSERVE_KERNEL_DIR"] = os.path.abspath(args.kernel_dir)
    from adapterserve.runtime.native import lora_kernel, ort_ops
    from adapterserve.runtime.native.hardware import probe

    print(probe().summary())
    ok = True
    for name, get, why in (("fused LoRA kernel", lambda: getattr(lora_kernel.load(), "path", None),
                            lora_kernel.unavailable_reason),
                           ("ONNX Runtime ops", ort_ops.library_path, ort_ops.unavailable_reason)):
        path = get()
        print(f"{name}: {path}" if path else f"{name}: not built ({why()})")
        ok = ok and bool(path)
    return 0 if ok else 1


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _TOOLS:
        import importlib

        return importlib.import_module(_TOOLS[argv[0]][0]).main(argv[1:]) or 0
    args = _parser().parse_args(argv)
    if args.command == "serve":
        import logging

        from adapterserve.runtime.errors import AdapterServeError
        from adapterserve.runtime.server.settings import config_from_args

        try:
            config = config_from_args(args)
        except AdapterServeError as e:
            print(f"adapterserve serve: error: {e}", file=sys.stderr)
            return 2
        # Only now the server and what it imports (torch, transformers, ONNX Runtime: seconds): a bad
        # flag or environment value is refused at once.
        from adapterserve.runtime.server.app import run

        logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return run(config)
    if args.command == "build-kernels":
        return _build_kernels(args)
    return _client_command(args)


if __name__ == "__main__":
    sys.exit(main())
