#!/usr/bin/env bash
# CUDA benchmarks in one go (under 10 minutes on one GPU): re-ranking pairs/s at K = 100 in fp32
# (TF32 off) and bf16 with the largest K that fits in one batch, extraction images/s at batch
# sizes 1 / 8 / 32, peak GPU memory; the mining benchmark too once bench/mining.py exists.
# Prints each benchmark's table, then one summary table.  Usage: bash bench/gpu.sh [python]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
DEVICE=${DEVICE:-cuda}             # DEVICE=cpu with small sizes checks the script itself
RERANK_ARGS=${RERANK_ARGS:---sizes 48x64 --candidates 100 --scaling-ks 100,1000 --scaling-size 48x64 --max-batch-limit 4096}
EXTRACT_ARGS=${EXTRACT_ARGS:---images 32 --batch-sizes 1,8,32 --threads 8}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
timeout 300 "$PY" bench/rerank.py --device "$DEVICE" $RERANK_ARGS | tee "$out/rerank.md"
timeout 240 "$PY" bench/extract.py --device "$DEVICE" $EXTRACT_ARGS | tee "$out/extract.md"
if [[ -f bench/mining.py ]]; then
  timeout 120 "$PY" bench/mining.py --device "$DEVICE" | tee "$out/mining.md"
fi

# one table: the rows that answer the issue's questions, pulled from the tables above
echo
echo "| benchmark | mode | throughput | peak GPU MiB |"
echo "| --- | --- | ---: | ---: |"
awk -F'|' '/\(b\) fast fp32|\(c\) fast bf16/ {gsub(/^ +| +$/, "", $3); gsub(/^ +| +$/, "", $4); gsub(/ /, "", $6); gsub(/ /, "", $10);
  print "| rerank " $2 "| " $3 ", " $4 " | " $6 " pairs/s | " $10 " |"}' "$out/rerank.md"
awk -F'|' '/^\| [0-9]+ \| [0-9]+ \| \(/ {gsub(/ /, "", $3); gsub(/^ +| +$/, "", $4); gsub(/^ +| +$/, "", $5); gsub(/ /, "", $6); gsub(/ /, "", $11);
  print "| extract, batch " $3 " | " $4 ", " $5 " | " $6 " images/s | " $11 " |"}' "$out/extract.md"
grep -h "largest K" "$out/rerank.md" | sed 's/^/| rerank | /; s/: / | K = /; s/$/ | - |/' || true
