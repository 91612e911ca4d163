#!/usr/bin/env bash
# The test suite: each family's tests run in that family's environment (the same one its image has).
# Usage: bash scripts/test.sh [family ...]   (default: all; extra pytest args via PYTEST_ARGS)
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_envs.sh || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
families=${*:-"core download conditioning vision train e2e"}
failed=()
for fam in $families; do
  python=.venvs/$fam/bin/python
  [ "$fam" = e2e ] && python=.venvs/core/bin/python  # the whole pipeline, driven from the core environment
  [ -d "tests/$fam" ] || continue
  echo "=== tests/$fam ($python)"
  start=$(date +%s)
  "$python" -m pytest "tests/$fam" ${PYTEST_ARGS:-} || failed+=("$fam")
  echo "=== tests/$fam took $(( $(date +%s) - start )) s"
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED: ${failed[*]}"
  exit 1
fi
echo "all test families passed"
