#!/usr/bin/env bash
# Re-resolves envs/<family>.in into envs/<family>.lock.txt (run after editing a .in file).
# The local-version tag (+cpu) of a find-links torch wheel is stripped, so the same lock
# installs the CPU wheel here and PyPI's build in an image.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${UV_FIND_LINKS:-}" ] && [ -n "${PIP_FIND_LINKS:-}" ]; then export UV_FIND_LINKS=$PIP_FIND_LINKS; fi
UV=$(command -v uv || echo "$(python3 -m site --user-base)/bin/uv")
for fam in ${*:-core vision download conditioning train}; do
  rm -f "envs/$fam.lock.txt"  # an existing lock pins torch without +cpu, which would pull the CUDA build
  "$UV" pip compile --quiet --python-version 3.11 "envs/$fam.in" -o "envs/$fam.lock.txt"
  sed -i -E 's/^(torch==[0-9.]+)\+cpu/\1/' "envs/$fam.lock.txt"
done
