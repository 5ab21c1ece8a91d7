# Sourced by the scripts: the venv, and the local data mirror (../shared/data beside the checkout,
# when it exists) from which `harness` imports datasets it does not have yet.
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$repo/.venv/bin/activate"
if [ -z "${HARNESS_DATA_MIRROR:-}" ] && [ -d "$repo/../shared/data" ]; then
  export HARNESS_DATA_MIRROR="$(cd "$repo/../shared/data" && pwd)"
fi
