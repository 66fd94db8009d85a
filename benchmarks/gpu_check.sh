#!/usr/bin/env bash
# The GPU checks in one call to a lent device (issue 25), sized to finish in about 8 minutes
# on one H100:
#   1. every `gpu`-marked test (and the compile test) on the GPU;
#   2. benchmarks/throughput.py --device cuda: the matmul peak (fp32, bf16), cells/s of
#      each stage for scVI, SCFM defaults (batch 128, 512) and the large configuration in
#      bf16-mixed, with and without torch.compile; MFU against the measured bf16 peak; peak
#      GPU memory.
#
# Here, once (needs the package registry; the device machine reaches nothing):
#   bash benchmarks/gpu_check.sh prepare
# writes .gpu/wheels (the packages its image lacks, for its Python 3.12) and .gpu/data (the
# Kang control file); .gpu/ is ignored by git and travels with `carry`. Then:
#   device run: command="bash benchmarks/gpu_check.sh run", carry=[".gpu"], timeout_s=600
# Everything it prints also goes to $OUT (gpu_tests.log, throughput.log, throughput_cuda.json).
set -uo pipefail

# Runtime dependencies of scfm_adapt that the device image does not hold (its package
# list: /work/.library/device/KINDS.md), at the versions of this project's environment.
WHEELS=(
  anndata==0.12.19 annotated-types==0.8.0 array-api-compat==1.16.0 docrep==0.3.2
  donfig==0.8.1.post1 google-crc32c==1.9.0 igraph==1.0.0 legacy-api-wrap==1.5
  leidenalg==0.12.0 ml-collections==1.1.0 mudata==0.3.10 muon==0.1.9 natsort==8.4.0
  numcodecs==0.16.6 pydantic==2.14.4 pydantic-core==2.50.5 pynndescent==0.7.0
  pyro-api==0.1.2 pyro-ppl==1.9.2 pytz==2026.6 scanpy==1.11.5 scverse-misc==0.0.3
  scvi-tools==1.4.2 session-info2==0.4.1 sparse==0.19.3 texttable==1.7.2 tomlkit==0.15.3
  typing-inspection==0.4.5 tzdata==2026.6 umap-learn==0.5.12 zarr==3.1.6
)
PLATFORMS=()
for n in 17 24 27 28 31 34 35; do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done

case "${1:-run}" in
prepare)
  mkdir -p .gpu/wheels .gpu/data
  for w in "${WHEELS[@]}"; do
    # A package published as source only (pure Python, e.g. docrep) is built here.
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux2014_x86_64 "${PLATFORMS[@]}" \
      -d .gpu/wheels "$w" 2>/dev/null ||
      python3 -m pip wheel -q --no-deps -w .gpu/wheels "$w" || exit 1
  done
  data="${SCFM_ADAPT_DATA:-../shared/data}"
  cp "$data/kang2018_ctrl_8donors.h5ad" .gpu/data/ || exit 1
  du -sh .gpu
  ;;
run)
  OUT="${OUT:-/tmp/gpu_check}"
  mkdir -p "$OUT"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu/wheels/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD/src" PYTHONUNBUFFERED=1 SCFM_ADAPT_DATA="$PWD/.gpu/data"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
  python3 -c "import torch, scvi, scfm_adapt; print(torch.__version__, scvi.__version__)"
  timeout 150 python3 -m pytest -q -p no:cacheprovider --runslow \
    tests/model/test_scale.py -k "gpu or compile" 2>&1 | tee "$OUT/gpu_tests.log"
  timeout 400 python3 benchmarks/throughput.py --sections real --device cuda \
    --models scvi scfm scfm_batch512 scfm_large scfm_large_compile \
    --epochs 3 --epochs-large 3 --cache /tmp/throughput \
    --out "$OUT/throughput_cuda.json" 2>&1 | tee "$OUT/throughput.log"
  ;;
*)
  echo "usage: bash benchmarks/gpu_check.sh prepare|run" >&2
  exit 2
  ;;
esac
