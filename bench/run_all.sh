#!/usr/bin/env bash
# Every benchmark in its stage family's environment, then one combined Markdown table (bench/report.py),
# also written to bench/results/report.md.
# Usage: bash bench/run_all.sh [name ...]   names: conditioning download clip_blip curate memory end_to_end train_step
#        (default: all of these), and, only when named (long on a small CPU machine): train_memory (compile-only
#        real-size training memory), real_sizes (the production models through the real stages on CPU, ~40 min),
#        knn_index (an autofaiss index built and served, recall and latency; BENCH_ARGS_knn_index="--count 1000000"
#        for the README's size, ~15 min to build on 2 cores) and convergence (our trainer vs diffusers' PyTorch step
#        to a held-out edge-F1 target on the fill domain, ~20 min on 2 cores; its scorer runs in the vision env)
# Options for one script: BENCH_ARGS_<name>, e.g. BENCH_ARGS_conditioning="--images 400" bash bench/run_all.sh conditioning
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
declare -A FAMILY=([conditioning]=conditioning [download]=download [clip_blip]=vision [curate]=vision [memory]=core
                   [end_to_end]=core [train_step]=train [train_memory]=train [real_sizes]=vision
                   [knn_index]=vision [convergence]=train)
names=${*:-"conditioning download clip_blip curate memory end_to_end train_step"}
failed=()
for name in $names; do
  family=${FAMILY[$name]:-}
  if [ -z "$family" ]; then echo "unknown benchmark '$name'; known: ${!FAMILY[*]}"; exit 2; fi
  python=.venvs/$family/bin/python
  if [ ! -x "$python" ]; then
    echo "=== bench/$name.py: no $python (FAMILIES=$family bash scripts/setup_envs.sh makes it)"; failed+=("$name"); continue
  fi
  args_var="BENCH_ARGS_$name"
  echo "=== bench/$name.py ($python) ${!args_var:-}"
  start=$(date +%s)
  # shellcheck disable=SC2086  # the extra options are meant to split into words
  "$python" "bench/$name.py" ${!args_var:-} || failed+=("$name")
  echo "=== bench/$name.py took $(( $(date +%s) - start )) s"
done
echo
report_python=.venvs/core/bin/python
[ -x "$report_python" ] || report_python=python3
"$report_python" bench/report.py --output bench/results/report.md
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED: ${failed[*]}"
  exit 1
fi
