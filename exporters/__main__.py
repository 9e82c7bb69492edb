"""adapterserve export {task,shared} ...

  task    base + one adapter merged -> a self-contained ONNX folder, with a parity report
  shared  the slot-wrapped shared base -> ONNX graph the `--engine onnx` server runs
"""
from __future__ import annotations

import argparse
import logging
import sys

from adapterserve.adapters.tabular import read_examples


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="adapterserve export")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("task", help="export base + one adapter, merged")
    t.add_argument("--adapter", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--base-model", default=None)
    t.add_argument("--quantize", choices=["int8"], default=None)
    t.add_argument("--fp16", action="store_true", help="fp16 weights for the CUDA execution provider")
    t.add_argument("--no-optimize", action="store_true")
    t.add_argument("--parity-data", default=None,
                   help="CSV/TSV of texts for the parity check (default: a built-in sample of sentences)")
    t.add_argument("--parity-text-col", default="sentence")
    t.add_argument("--parity-label-col", default="label")
    t.add_argument("--parity-limit", type=int, default=256)
    s = sub.add_parser("shared", help="export the shared-base graph with slot inputs")
    s.add_argument("--out", required=True)
    s.add_argument("--base-model", default=None)
    s.add_argument("--slots", type=int, default=64)
    s.add_argument("--r-max", type=int, default=16)
    s.add_argument("--quantize", choices=["int8"], default=None)
    s.add_argument("--lora-op", choices=["auto", "fused", "stock"], default="auto",
                   help="LoRA nodes: our ONNX Runtime custom op (fused; auto = where it can be built) or stock ops "
                        "(any ONNX Runtime, slower)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    if args.command == "task":
        from adapterserve.exporters.parity import print_report, task_model_parity
        from adapterserve.exporters.per_task import export_task

        path = export_task(args.adapter, args.out, args.base_model, args.quantize, args.fp16, not args.no_optimize)
        print(f"wrote {path}")
        if args.fp16:
            print("parity: skipped (fp16 graphs target the CUDA execution provider; none here)")
            return 0
        if args.parity_data:
            texts = [e.text for e in read_examples(args.parity_data, args.parity_text_col, args.parity_label_col,
                                                   limit=args.parity_limit)]
        else:
            from adapterserve.exporters.parity import SAMPLE_TEXTS as texts
        print_report("parity vs torch fp32", task_model_parity(args.out, args.adapter, texts, args.base_model))
        return 0

    from adapterserve.runtime.config import RuntimeConfig
    from adapterserve.runtime.runtime import Runtime

    rt = Runtime(RuntimeConfig(base_model=args.base_model, slots=args.slots, r_max=args.r_max, engine="onnx",
                               precision="int8" if args.quantize else "fp32", onnx_dir=args.out,
                               lora_kernel={"auto": "auto", "fused": "fused", "stock": "torch"}[args.lora_op]))
    print(f"wrote {rt.engine.model_dir} ({'token-packed' if rt.engine.packed else 'padded'} layout)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
