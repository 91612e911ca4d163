#!/usr/bin/env bash
# Creates one locked virtual environment per image family under .venvs/ (the same
# families become the Docker images). Idempotent: a family whose lock did not change is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if ! command -v uv >/dev/null 2>&1; then
  "$PY" -m pip install --quiet --user "uv>=0.5" 2>/dev/null || "$PY" -m pip install --quiet "uv>=0.5"
fi
UV=$(command -v uv || echo "$("$PY" -m site --user-base)/bin/uv")
export UV_PYTHON_DOWNLOADS=never
# A CPU torch wheel in a local find-links folder (PIP_FIND_LINKS) is preferred to PyPI's CUDA build.
if [ -z "${UV_FIND_LINKS:-}" ] && [ -n "${PIP_FIND_LINKS:-}" ]; then export UV_FIND_LINKS=$PIP_FIND_LINKS; fi
FAMILIES=${FAMILIES:-"core vision download conditioning train"}
for fam in $FAMILIES; do
  venv=.venvs/$fam
  stamp=$venv/.lock-sha
  want=$( (cat envs/$fam.lock.txt pyproject.toml; echo bytecode) | sha256sum | cut -c1-16)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then continue; fi
  echo "setting up environment '$fam' ($venv)" >&2
  [ -x "$venv/bin/python" ] || "$UV" venv --quiet --python "$PY" "$venv"
  "$UV" pip install --quiet --python "$venv/bin/python" -r "envs/$fam.lock.txt"
  "$UV" pip install --quiet --python "$venv/bin/python" --no-deps -e .
  # Bytecode for every installed module, as the images have (UV_COMPILE_BYTECODE): where PYTHONDONTWRITEBYTECODE
  # is set, Python would otherwise recompile torch, jax, img2dataset... in every process it starts (~2 s each).
  "$venv/bin/python" -m compileall -q -j 0 "$venv/lib" >/dev/null 2>&1 || true
  echo "$want" > "$stamp"
done
