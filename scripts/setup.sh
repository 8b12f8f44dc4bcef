# Shared set-up for scripts/up and scripts/test (sourced, not run): system packages and the venv.
# Idempotent: a second run installs nothing new. Wheels only: nothing is compiled (dlib-bin for
# detection and landmarks, onnxruntime for the descriptor).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${SUBDISC_VENV:-$ROOT/.venv}
PY=${PYTHON:-python3}

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

install_system_packages() {
    # redis-server: the state store. Everything else comes as wheels.
    command -v redis-server >/dev/null && return 0
    say "installing system packages: redis-server"
    local sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server >/dev/null
}

install_venv() {
    "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || { echo "subdisc needs Python 3.11 or newer ($PY is $("$PY" --version))" >&2; exit 1; }
    if [ ! -x "$VENV/bin/python" ]; then
        say "creating the virtual environment $VENV"
        "$PY" -m venv "$VENV"
    fi
    say "installing subdisc and its dependencies into $VENV (wheels only)"
    "$VENV/bin/pip" install -q --upgrade pip >/dev/null
    # --prefer-binary: wheels wherever they exist; face-recognition-models is only an sdist, of model
    # files and Python (nothing to compile).
    "$VENV/bin/pip" install -q --prefer-binary -e "$ROOT[test]"
}

build_models() {
    # The descriptor's ONNX graph, built from dlib's network file once (~2 s) and kept in
    # $SUBDISC_CACHE/models (default ~/.cache/subdisc/models), so workers start without building it.
    "$VENV/bin/python" -c 'from workers.pipeline import get_pipeline; get_pipeline()'
}
