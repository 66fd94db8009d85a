#!/usr/bin/env bash
# Install one peer into its own virtual environment, never the project's:
#   benchmarks/peers/install.sh celltypist|cpa|gears|cellflow|scgpt [VENVS]
# VENVS defaults to $SCFM_PEER_VENVS or ../peer-venvs (beside the checkout). The versions
# are those measured in benchmarks/README.md; each venv's `pip freeze` is kept beside it
# (freeze.txt). torch is installed first, alone, so that a peer's requirements find it:
# - gears: torch 2.13.0, which pip takes from the CPU wheel on this machine's disk (on a
#   machine without it, pip fetches the CUDA build: add --index-url for the CPU one);
# - cpa: cpa-tools 0.8.1 requires torch<2 and scvi-tools<1. torch 1.13.1 fails to import
#   under Python 3.11 here (a dataclass default in torch.distributed._shard, reached through
#   pytorch-lightning 1.9), so this venv is Python 3.10 with PyPI's torch 1.13.1 (a CUDA
#   build that runs on the CPU) and the older stack scvi-tools 0.20.3 was released with.
# - scgpt: scgpt 0.2.4 without its declared requirements (torchtext, scvi-tools<1,
#   cell-gears<0.0.3, orbax ...: none installs beside torch 2.13 on Python 3.11), plus
#   what its model code and value binning import (torch, numpy, tqdm, scanpy). It is the
#   reference of the scGPT backbone's fidelity test (scgpt_reference.py), not a peer run.
# scLDM and CFGen are not installed: see benchmarks/README.md (generation).
set -euo pipefail
peer="$1"
venvs="${2:-${SCFM_PEER_VENVS:-$(cd "$(dirname "$0")/../../.." && pwd)/peer-venvs}}"
python=python3
torch=""
nodeps=()
case "$peer" in
  celltypist) pkgs=(celltypist==1.7.1 "scikit-learn<1.8") ;;  # 1.8 removed multi_class
  gears) torch=torch==2.13.0; pkgs=(cell-gears==0.1.2 torch-geometric==2.8.1) ;;
  cellflow) pkgs=(cellflow-tools==0.0.9 requests) ;;  # cellflow imports requests, undeclared
  scgpt) torch=torch==2.13.0; pkgs=(numpy tqdm scanpy); nodeps=(scgpt==0.2.4) ;;
  cpa)
    python=python3.10
    torch=torch==1.13.1
    pkgs=(cpa-tools==0.8.1 numpy==1.26.4 "setuptools<70" jax==0.4.23 jaxlib==0.4.23
      ml_dtypes==0.3.2 flax==0.7.5 optax==0.1.7 chex==0.1.85 numpyro==0.13.2
      orbax-checkpoint==0.4.8 anndata==0.9.2 pandas==1.5.3 mudata==0.2.3 torchmetrics==0.11.4
      scipy==1.11.4 scikit-learn==1.3.2 scanpy==1.9.8 seaborn==0.13.2 matplotlib==3.8.4
      h5py==3.10.0 statsmodels==0.14.1)
    ;;
  *) echo "unknown peer '$peer': one of celltypist cpa gears cellflow scgpt" >&2; exit 2 ;;
esac
if ! "$python" -c "" 2> /dev/null; then  # a pyenv shim answers but may not run
  found=$(ls -d "$(pyenv root 2> /dev/null || echo ~/.pyenv)"/versions/${python#python}*/bin/"$python" 2> /dev/null | tail -1)
  if [[ -z "$found" ]]; then
    echo "$peer needs $python (see the comment at the top of $0)" >&2
    exit 3
  fi
  python="$found"
fi
venv="$venvs/$peer"
"$python" -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
if [[ -n "$torch" ]]; then
  "$venv/bin/pip" install -q "$torch"
  pkgs=("$torch" "${pkgs[@]}")  # on the same line, so that pip keeps this torch
fi
"$venv/bin/pip" install -q "${pkgs[@]}"
if [[ ${#nodeps[@]} -gt 0 ]]; then
  "$venv/bin/pip" install -q --no-deps "${nodeps[@]}"
fi
"$venv/bin/pip" freeze > "$venv/freeze.txt"
echo "$peer installed in $venv"
