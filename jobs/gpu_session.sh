#!/usr/bin/env bash
# The GPU checks behind BENCHMARKS.md "GPU", on one machine with CUDA, torch, sentence-transformers
# and Ray installed (embedpipe itself from this checkout):
#
#   bash jobs/gpu_session.sh tests OUTDIR                      # tests/test_gpu.py + test_encode.py + test_ready.py
#   bash jobs/gpu_session.sh bench OUTDIR SENTENCES.txt [COPIES] [--variants ...]
#   bash jobs/gpu_session.sh all OUTDIR                        # one device session, in the order issue 21 asks:
#       the GPU tests; steady state on ~1.08M short sentences (WordNet x 6) with replicas per GPU 1, 2 and 4
#       and with the files built in the encoder (--writer encoder; the default on GPUs is separate)
#       against both sentence-transformers scripts; ~74-token passages (data/passages.py x 4);
#       the host benchmark's near-zero-cost model on 1M lines;
#       mining 200,000 x 384 with the block products on the GPU, then on the CPUs.
#
# bench: `embedpipe embed --device cuda` (whole command) against jobs/st_baseline.py on the same
# GPU, float32 batch 32 (ST's defaults) and float16 batch 256 (a tuned ST script), on the lines of
# SENTENCES.txt (data/short_sentences.py writes WordNet's 180k short sentences). With COPIES > 1
# every line also appears COPIES-1 more times with " (k)" appended: distinct texts, so none is
# deduplicated, for a corpus long enough that start-up does not dominate.
set -uo pipefail
what=${1:?tests or bench}
out=${2:?OUTDIR}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"

case "$what" in
tests)
  python3 -m pytest -p no:cacheprovider -q -ra tests/test_gpu.py tests/test_encode.py tests/test_ready.py 2>&1 | tee "$out/tests.log"
  ;;
all)
  bash "$0" tests "$out"
  python3 data/short_sentences.py "$out/short.txt"
  bash "$0" bench "$out" "$out/short.txt" 6 "" "--encoders-per-gpu 2" "--encoders-per-gpu 4" "--writer encoder"
  python3 data/passages.py "$out/passages.txt"
  bash "$0" bench "$out" "$out/passages.txt" 4 ""
  python3 jobs/benchmark.py --task host --lines 1000000 --device cuda 2>&1 | tee "$out/host.log"
  for d in cuda cpu; do  # mining 200,000 x 384: block products on the GPU, then on the host's CPUs
    python3 jobs/benchmark.py --task mine --vectors 200000 --dim 384 --mine-args "--device $d" 2>&1 | tee "$out/mine-$d.log"
  done
  ;;
bench)
  src=${3:?SENTENCES.txt}
  copies=${4:-1}
  shift 4 2>/dev/null || shift $#
  corpus="$out/corpus.txt"
  python3 - "$src" "$copies" "$corpus" <<'EOF'
import sys
src, copies, dst = sys.argv[1], int(sys.argv[2]), sys.argv[3]
lines = [l.rstrip("\n") for l in open(src, encoding="utf-8") if l.strip()]
with open(dst, "w", encoding="utf-8") as f:
    for k in range(copies):
        f.writelines((l if k == 0 else f"{l} ({k})") + "\n" for l in lines)
print(f"{len(lines) * copies} sentences")
EOF
  variants=("$@")
  [ ${#variants[@]} -eq 0 ] && variants=("")
  python3 jobs/benchmark.py --device cuda --input "$corpus" --docs 100000000 \
    --variants "${variants[@]}" --st-variants "" "--dtype float16 --batch-size 256" --markdown \
    2>&1 | tee "$out/bench-$copies.log"
  rm -f "$corpus"
  ;;
esac
