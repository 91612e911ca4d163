#!/usr/bin/env bash
# Creates one locked virtual environment per image family under .venvs/ (the same
# families become the Docker images). Idempotent: a family whose lock did not change is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
# Not by default: index (autofaiss, ~0.3 GB), which only `pipeline.py index`, its tests and bench/knn_index.py use;
# they make it on first use (components/knn_index/driver.py: FAMILIES=index), so a set-up for running the pipeline
# does not wait for it.
FAMILIES=${FAMILIES:-"core vision download conditioning train"}
lock_sha() { (cat "envs/$1.lock.txt" pyproject.toml; echo bytecode) | sha256sum | cut -c1-16; }
todo=()
for fam in $FAMILIES; do
  stamp=.venvs/$fam/.lock-sha
  [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$(lock_sha "$fam")" ] || todo+=("$fam")
done
[ ${#todo[@]} -gt 0 ] || exit 0
# Say what takes the time: a first set-up installs a few hundred packages (about 4.6 GB under .venvs/ in all).
echo "setting up ${#todo[@]} environment(s) under .venvs/: ${todo[*]} (the first time takes a few minutes)" >&2
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
UV=$(command -v uv || echo "$("$PY" -m site --user-base)/bin/uv")
if [ ! -x "$UV" ]; then
  echo "installing uv (the installer) with pip" >&2
  "$PY" -m pip install --quiet --user "uv>=0.5" 2>/dev/null || "$PY" -m pip install --quiet "uv>=0.5"
  UV=$(command -v uv || echo "$("$PY" -m site --user-base)/bin/uv")
fi
export UV_PYTHON_DOWNLOADS=never
# A CPU torch wheel in a local find-links folder (PIP_FIND_LINKS) is preferred to PyPI's CUDA build.
if [ -z "${UV_FIND_LINKS:-}" ] && [ -n "${PIP_FIND_LINKS:-}" ]; then export UV_FIND_LINKS=$PIP_FIND_LINKS; fi
quiet=--quiet
[ -t 2 ] && quiet=""  # on a terminal uv shows its own progress; in a log, a line per step says where it is
i=0
for fam in "${todo[@]}"; do
  i=$((i + 1)) start=$SECONDS venv=.venvs/$fam
  echo "[$i/${#todo[@]}] $fam: installing $(grep -cE '^[A-Za-z0-9]' "envs/$fam.lock.txt") locked packages (envs/$fam.lock.txt) into $venv" >&2
  [ -x "$venv/bin/python" ] || "$UV" venv --quiet --python "$PY" "$venv"
  "$UV" pip install $quiet --python "$venv/bin/python" -r "envs/$fam.lock.txt"
  "$UV" pip install --quiet --python "$venv/bin/python" --no-deps -e .
  # Bytecode for every installed module, as the images have (UV_COMPILE_BYTECODE): where PYTHONDONTWRITEBYTECODE
  # is set, Python would otherwise recompile torch, jax, img2dataset... in every process it starts (~2 s each).
  echo "[$i/${#todo[@]}] $fam: compiling bytecode ($((SECONDS - start)) s so far)" >&2
  "$venv/bin/python" -m compileall -q -j 0 "$venv/lib" >/dev/null 2>&1 || true
  lock_sha "$fam" > "$venv/.lock-sha"
  echo "[$i/${#todo[@]}] $fam: ready in $((SECONDS - start)) s ($(du -sh "$venv" | cut -f1))" >&2
done
