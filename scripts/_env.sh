# Shared by scripts/demo and scripts/test: create .venv if missing and install the project.
# CPU torch is pinned through constraints.txt; an unpinned torch would pull a multi-GB
# CUDA build. Set GOSSIP_TRAIN_PYTHON to choose the interpreter (default python3).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${GOSSIP_TRAIN_PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "creating .venv with $($PY --version)" >&2
    "$PY" -m venv .venv
fi
VENV_PY="$ROOT/.venv/bin/python"
install_project() {  # $1: extras, e.g. "[dev]" or ""
    local stamp=".venv/.installed$1"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
        echo "installing gossip-train$1 into .venv" >&2
        "$VENV_PY" -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".$1" \
            2> >(grep -v "WARNING: Location" >&2)
        touch "$stamp"
    fi
}
