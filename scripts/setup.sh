# Shared set-up for scripts/up and scripts/test (sourced, not run): system packages and the venv.
# Idempotent: a second run installs nothing new.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${SUBDISC_VENV:-$ROOT/.venv}
CACHE=${SUBDISC_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/subdisc}
WHEELS=$CACHE/wheels
DLIB_VERSION=${SUBDISC_DLIB_VERSION:-20.0.1}
PY=${PYTHON:-python3}

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

install_system_packages() {
    # redis-server: the state store; libopenblas-dev + cmake + g++: building dlib with BLAS.
    local need=()
    command -v redis-server >/dev/null || need+=(redis-server)
    dpkg -s libopenblas-dev >/dev/null 2>&1 || need+=(libopenblas-dev)
    command -v cmake >/dev/null || need+=(cmake)
    command -v g++ >/dev/null || need+=(g++)
    [ ${#need[@]} -eq 0 ] && return 0
    say "installing system packages: ${need[*]}"
    local sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
}

install_venv() {
    "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || { echo "subdisc needs Python 3.11 or newer ($PY is $("$PY" --version))" >&2; exit 1; }
    if [ ! -x "$VENV/bin/python" ]; then
        say "creating the virtual environment $VENV"
        "$PY" -m venv "$VENV"
    fi
    say "installing subdisc and its dependencies into $VENV"
    "$VENV/bin/pip" install -q --upgrade pip >/dev/null
    "$VENV/bin/pip" install -q -e "$ROOT[test]"
}

dlib_has_blas() {
    "$VENV/bin/python" -c 'import dlib, sys; sys.exit(0 if dlib.DLIB_USE_BLAS else 1)' 2>/dev/null
}

install_fast_dlib() {
    # dlib-bin (the quick default) has no BLAS: descriptors are ~5x slower. Build dlib against
    # OpenBLAS once (~8 min on 2 cores), keep the wheel, and install it over dlib-bin.
    dlib_has_blas && return 0
    local wheel
    wheel=$(ls "$WHEELS"/dlib-"$DLIB_VERSION"-*.whl 2>/dev/null | head -1 || true)
    if [ -z "$wheel" ]; then
        say "building dlib $DLIB_VERSION with BLAS (once, ~8 minutes; cached in $WHEELS)"
        mkdir -p "$WHEELS"
        "$VENV/bin/pip" wheel -q --no-deps --no-binary dlib "dlib==$DLIB_VERSION" -w "$WHEELS"
        wheel=$(ls "$WHEELS"/dlib-"$DLIB_VERSION"-*.whl | head -1)
    fi
    say "installing the BLAS build of dlib ($wheel)"
    "$VENV/bin/pip" uninstall -q -y dlib-bin >/dev/null 2>&1 || true
    "$VENV/bin/pip" install -q --no-deps --force-reinstall "$wheel"
    dlib_has_blas || { echo "the dlib wheel $wheel has no BLAS" >&2; exit 1; }
}
