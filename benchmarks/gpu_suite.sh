#!/usr/bin/env bash
# Every benchmark on one device, then the ratios that matter on one screen.
#
#   benchmarks/gpu_suite.sh                 # CUDA: under 5 minutes on one modern GPU
#   benchmarks/gpu_suite.sh --device cpu    # the same scripts at toy sizes (~1-2 min), to test it
#
# Logs go to ${OUT:-/tmp/vitdiag_gpu_suite}/<name>.txt; the summary is printed at the end.
# COMPILE=0 skips the torch.compile benchmark (on a CPU it is skipped unless COMPILE=1: inductor
# takes ~2 minutes to compile ViT-S there). PYTHON overrides the interpreter (default: the
# project's .venv if there is one).
set -euo pipefail

DEVICE=cuda
if [[ "${1:-}" == "--device" ]]; then DEVICE="$2"; fi
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
PYTHON="${PYTHON:-$([[ -x "$ROOT/.venv/bin/python" ]] && echo "$ROOT/.venv/bin/python" || echo python)}"
LOGS="${OUT:-/tmp/vitdiag_gpu_suite}"
mkdir -p "$LOGS"
cd "$ROOT"

if [[ "$DEVICE" == cuda* ]]; then
  OVERHEAD=(--images 512 --batch-size 64 --reps 3)
  AMPS=(off bf16)
  THROUGHPUT=(--images 1024 --batch-size 128 --workers 0,8)
  INVARIANCE=(--images 256 --batch-size 64 --workers 0,8)
  AGREEMENT=(--limit 96)
  COMPILE_ARGS=(--batch-size 64 --amp bf16 --reps 5)
  MEMORY=(--sizes 10000,100000,1000000)
  COMPILE="${COMPILE:-1}"
else
  OVERHEAD=(--images 8 --batch-size 8 --reps 1 --threads 1 --clock process)
  AMPS=(off)
  THROUGHPUT=(--arch vit_tiny_patch16_224 --images 8 --batch-size 8 --workers 0 --threads 1)
  INVARIANCE=(--arch vit_tiny_patch16_224 --images 4 --batch-size 4 --views 2 --workers 0 --threads 1)
  AGREEMENT=(--models vit_nomix --limit 16 --threads 1)
  COMPILE_ARGS=(--batch-size 4 --reps 2 --threads 1)
  MEMORY=(--sizes 2000,4000 --dim 64 --classes 50 --budget 500)
  COMPILE="${COMPILE:-0}"
fi

run() {  # run NAME CMD...: log to $LOGS/NAME.txt, say how long it took
  local name="$1"; shift
  local start=$SECONDS
  echo "== $name: $*" >&2
  "$@" > "$LOGS/$name.txt" 2>&1 || { echo "!! $name failed, see $LOGS/$name.txt" >&2; tail -5 "$LOGS/$name.txt" >&2; return 0; }
  echo "   $((SECONDS - start)) s" >&2
}

START=$SECONDS
for amp in "${AMPS[@]}"; do
  # each probe alone over the bare forward: once, at full precision
  extra=(); [[ "$amp" == off ]] && extra=(--breakdown)
  run "overhead_$amp" "$PYTHON" benchmarks/bench_report_overhead.py --device "$DEVICE" --amp "$amp" \
    "${OVERHEAD[@]}" "${extra[@]}"
done
run throughput_eval "$PYTHON" benchmarks/bench_throughput.py --device "$DEVICE" --probes eval "${THROUGHPUT[@]}"
run throughput_invariance "$PYTHON" benchmarks/bench_throughput.py --device "$DEVICE" --probes invariance "${INVARIANCE[@]}"
run amp_agreement "$PYTHON" benchmarks/bench_amp_agreement.py --device "$DEVICE" "${AGREEMENT[@]}"
run collapse_memory "$PYTHON" benchmarks/bench_collapse_memory.py --device "$DEVICE" "${MEMORY[@]}"
run collapse_dtype "$PYTHON" benchmarks/bench_collapse_dtype.py --device "$DEVICE" --reps 5
if [[ "$COMPILE" == 1 ]]; then
  run compile "$PYTHON" benchmarks/bench_compile.py --device "$DEVICE" "${COMPILE_ARGS[@]}"
fi

echo
echo "===== vitdiag benchmark suite on $DEVICE: $((SECONDS - START)) s (logs in $LOGS) ====="
for amp in "${AMPS[@]}"; do
  f="$LOGS/overhead_$amp.txt"
  [[ -f "$f" ]] || continue
  echo "-- report shared pass / bare forward_features, amp $amp"
  grep -E "^(median ratio|images/s)|^  [a-z]+ " "$f" || true
done
for f in "$LOGS/throughput_eval.txt" "$LOGS/throughput_invariance.txt"; do
  [[ -f "$f" ]] || continue
  echo "-- $(basename "$f" .txt) (images/s, views/s)"
  grep -E "^(eval|invariance) " "$f" || true
done
if [[ -f "$LOGS/amp_agreement.txt" ]]; then
  echo "-- headline metrics, max relative difference (amp vs fp32; float32 vs float64 products)"
  sed -n '/^metric/,$p' "$LOGS/amp_agreement.txt"
fi
if [[ -f "$LOGS/collapse_memory.txt" ]]; then
  echo "-- collapse memory and time as N grows"
  grep -E "^ +[0-9]+ |^(peak RSS|state |marginal)" "$LOGS/collapse_memory.txt" || true
fi
if [[ -f "$LOGS/collapse_dtype.txt" ]]; then
  echo "-- collapse update per batch, float64 vs float32 products"
  grep -E "^D=" "$LOGS/collapse_dtype.txt" || true
fi
if [[ -f "$LOGS/compile.txt" ]]; then
  echo "-- torch.compile of the hooked forward"
  grep -E "^(first compiled|hooks fired|median compiled|compiling)" "$LOGS/compile.txt" || true
fi
