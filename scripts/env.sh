# Sourced by the scripts: the venv, and the local data mirrors from which `harness` imports datasets it
# does not have yet: ../shared/data beside the checkout (when HARNESS_DATA_MIRROR is unset and it
# exists), then /usr/share/datasets (Debian's dataset-* packages, e.g. dataset-fashion-mnist) appended.
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$repo/.venv/bin/activate"
if [ -z "${HARNESS_DATA_MIRROR:-}" ] && [ -d "$repo/../shared/data" ]; then
  export HARNESS_DATA_MIRROR="$(cd "$repo/../shared/data" && pwd)"
fi
if [ -d /usr/share/datasets ]; then
  case ",${HARNESS_DATA_MIRROR:-}," in
    *,/usr/share/datasets,*) ;;
    *) export HARNESS_DATA_MIRROR="${HARNESS_DATA_MIRROR:+$HARNESS_DATA_MIRROR,}/usr/share/datasets" ;;
  esac
fi
