#!/usr/bin/env bash
# Download, HERE (a machine with a package index), the wheels that tools/gpu/single_gpu.py needs on the lent GPU
# machine, whose image has torch, transformers, numpy, pandas, sympy, einops, msgpack, ninja, psutil, py-cpuinfo,
# tqdm, packaging, but no deepspeed, hjson or pydantic, and no package index (tools/gpu/README.md).
#
#   tools/gpu/fetch_wheels.sh            # -> .whl/*.whl (gitignored), prints the total size
#
# The GPU machine is x86_64 with CPython 3.12: binary wheels (pydantic-core) are taken for that platform whatever
# this machine is; the others are pure Python. deepspeed publishes only an sdist: it is built here into a pure-Python
# wheel (no ops pre-built; the CUDA path of llmcomm compiles none). One version of each package, exact pins.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
[ -x .venv/bin/python ] && PY=${PY_OVERRIDE:-.venv/bin/python}
DEST=.whl
rm -rf "$DEST" && mkdir -p "$DEST"

# Pure Python: deepspeed's own needs that the image lacks, and pydantic's.
# typing-extensions is carried too: pydantic 2.14 needs >= 4.16, newer than some images ship.
PURE="hjson==3.1.0 pydantic==2.14.4 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0"
# Binary: pydantic-core, pinned by pydantic 2.14.4.
BINARY="pydantic-core==2.50.5"

"$PY" -m pip wheel -q --no-deps --no-build-isolation deepspeed==0.19.8 -w "$DEST" 2>/dev/null \
  || "$PY" -m pip wheel -q --no-deps deepspeed==0.19.8 -w "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d "$DEST" $PURE
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$DEST" $BINARY

ls -l "$DEST"
n=$(ls "$DEST"/*.whl | wc -l)
[ "$n" -eq 7 ] || { echo "expected 7 wheels in $DEST, found $n" >&2; exit 1; }
echo "total: $(du -cb "$DEST"/*.whl | tail -1 | cut -f1) bytes in $n wheels ($DEST, gitignored)"
