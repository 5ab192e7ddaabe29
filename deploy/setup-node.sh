#!/usr/bin/env bash
# Install cvnet's environment on a Ray node (cluster.yaml's setup commands, deploy/Dockerfile):
#   torch first - the CPU build from PyTorch's CPU index on CPU nodes, PyPI's CUDA build on GPU
#   nodes - then the pinned requirements, then the project itself (editable, no dependencies:
#   torch stays the build chosen here).
# usage: setup-node.sh cpu|gpu [PROJECT_DIR]   (PROJECT_DIR default: this script's checkout)
set -euo pipefail
build=${1:-}
project=${2:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
torch_pin=${TORCH_PIN:-torch==2.13.*}
case "$build" in
  cpu) pip install -q "$torch_pin" --index-url https://download.pytorch.org/whl/cpu ;;
  gpu) pip install -q "$torch_pin" ;;  # PyPI's Linux x86_64 wheel is the CUDA build
  *) echo "usage: $0 cpu|gpu [PROJECT_DIR]" >&2; exit 2 ;;
esac
pip install -q -r "$project/requirements.txt"
pip install -q --no-deps -e "$project"
