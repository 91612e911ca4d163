#!/usr/bin/env bash
# Build (and push) the container image of one component's family, or of all of them.
#
#   ./build_images.sh --namespace NS --repo REPO [-C COMPONENT|FAMILY|all] [--tag T] [--push] [--dry-run]
#
# Image references match pipeline_configs.ImagesConfig: REPO/NS/controlnet-<family>:T, with the
# training image in two variants (controlnet-train-cuda12, controlnet-train-tpu). Needs docker with
# the buildx plugin; --dry-run prints the commands only (REPO and NS stand in when not given).
set -euo pipefail
cd "$(dirname "$0")"

usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; }
namespace="" repo="" component="all" tag="0.1.0" push=0 dry_run=0 platform="linux/amd64"
while [ $# -gt 0 ]; do
  case "$1" in
    --namespace) namespace=${2:?}; shift 2 ;;
    --repo) repo=${2:?}; shift 2 ;;
    -C|--component) component=${2:?}; shift 2 ;;
    --tag) tag=${2:?}; shift 2 ;;
    --platform) platform=${2:?}; shift 2 ;;
    --push) push=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done

# component -> family, from the one registry (plain Python, no environment needed)
mapping=$(python3 -c 'from components.registry import STAGES, FAMILIES
for s in STAGES.values(): print(s.name, s.family)
for f in FAMILIES: print(f, f)')
family_of() { awk -v c="$1" '$1 == c {print $2; exit}' <<<"$mapping"; }

if [ "$component" = all ]; then
  families=$(python3 -c 'from components.registry import FAMILIES; print(" ".join(FAMILIES))')
else
  families=$(family_of "$component")
  if [ -z "$families" ]; then
    echo "unknown component '$component'; valid: all $(awk '{print $1}' <<<"$mapping" | sort -u | tr '\n' ' ')" >&2
    exit 2
  fi
fi

if [ "$dry_run" = 1 ]; then
  # only the commands: no docker needed, and placeholders for what was not given
  if [ -z "$namespace" ] || [ -z "$repo" ]; then
    echo "dry run without --repo/--namespace: REPO and NS stand for them" >&2
    namespace=${namespace:-NS} repo=${repo:-REPO}
  fi
else
  # what is missing, and how to get it, before anything starts (without buildx, docker only says: unknown flag)
  if ! command -v docker >/dev/null 2>&1; then
    echo "docker is not installed (or not on PATH): install Docker Engine, https://docs.docker.com/engine/install/" >&2
    exit 3
  fi
  if ! docker buildx version >/dev/null 2>&1; then
    echo "docker has no buildx plugin: install it (Debian/Ubuntu: apt-get install docker-buildx-plugin; or the binary" \
         "from https://github.com/docker/buildx/releases as ~/.docker/cli-plugins/docker-buildx), then check: docker buildx version" >&2
    exit 3
  fi
  [ -n "$namespace" ] && [ -n "$repo" ] || { echo "--namespace and --repo are required (or --dry-run to see the commands)" >&2; usage >&2; exit 2; }
fi

run() { if [ "$dry_run" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi; }
output=$([ "$push" = 1 ] && echo --push || echo --load)
for family in $families; do
  variants=("")
  [ "$family" = train ] && variants=(cuda12 tpu)
  for variant in "${variants[@]}"; do
    name="controlnet-$family${variant:+-$variant}"
    image="$repo/$namespace/$name:$tag"
    args=(docker buildx build --platform "$platform" -f "images/$family/Dockerfile" -t "$image")
    [ -n "$variant" ] && args+=(--build-arg "JAX_VARIANT=$variant")
    args+=(--label "org.opencontainers.image.source=controlnet-pipeline" "$output" .)
    run "${args[@]}"
    echo "image: $image"
  done
done
