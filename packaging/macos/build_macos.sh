#!/usr/bin/env bash
# Build the macOS app and disk image: PyInstaller's Tandem.app, then a compressed .dmg (hdiutil).
#
#   bash packaging/macos/build_macos.sh
#
# Run on macOS 12+ (Apple silicon or Intel: the app is built for the machine's own architecture) with
# Python 3.10-3.12 from python.org or Homebrew. Creates the venv .venv-mac (torch, the app's
# dependencies, PyInstaller; no triton: it is Linux-only) on first use.
# Outputs: packaging/dist/pyinstaller/Tandem.app and packaging/dist/tandem-VERSION-macos-ARCH.dmg
# The app is ad-hoc signed only (PyInstaller does that on arm64): for distribution, sign it with a
# Developer ID (codesign --deep --options runtime) and notarize the .dmg (xcrun notarytool).
# Not run by this project's CI (Linux only): see packaging/README.md.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
[[ "$(uname -s)" == Darwin ]] || { echo "build_macos.sh runs on macOS only" >&2; exit 1; }
VENV="${TANDEM_VENV:-$ROOT/.venv-mac}"
PY="$VENV/bin/python"
if [[ ! -x "$PY" ]]; then
    "${PYTHON:-python3}" -m venv "$VENV"
    "$PY" -m pip install --upgrade pip
    "$PY" -m pip install -e ".[packaging]"
fi
VERSION="$("$PY" -c 'import re; print(re.search(r"^version = \"([^\"]+)\"", open("pyproject.toml").read(), re.M).group(1))')"
ARCH="$(uname -m)"
DIST="$ROOT/packaging/dist"

"$PY" packaging/make_icons.py packaging/build/icons
TANDEM_ICON_DIR="$ROOT/packaging/build/icons" "$PY" -m PyInstaller --noconfirm --log-level WARN \
    --distpath "$DIST/pyinstaller" --workpath packaging/build/pyinstaller packaging/tandem.spec
APP="$DIST/pyinstaller/Tandem.app"
[[ -d "$APP" ]] || { echo "PyInstaller did not produce $APP" >&2; exit 1; }

# The frozen app's checks (its console output goes to the terminal when started this way).
"$APP/Contents/MacOS/tandem" --bundle-check

STAGE="$(mktemp -d)"
trap 'rm -rf "$STAGE"' EXIT
cp -R "$APP" "$STAGE/"
ln -s /Applications "$STAGE/Applications"
DMG="$DIST/tandem-$VERSION-macos-$ARCH.dmg"
rm -f "$DMG"
hdiutil create -volname "Tandem $VERSION" -srcfolder "$STAGE" -fs HFS+ -format UDZO -imagekey zlib-level=9 "$DMG"
ls -lh "$DMG"
