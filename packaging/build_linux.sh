#!/usr/bin/env bash
# Build the Linux installers: a PyInstaller one-folder app, a .tar.gz of it and a .deb.
#
#   bash packaging/build_linux.sh
#
# Needs the project's environment with the packaging extra (`pip install -e ".[packaging]"`, or
# TANDEM_EXTRAS=test,packaging bash packaging/setup_env.sh setup) and dpkg-deb for the .deb.
# Outputs (git-ignored):
#   packaging/dist/pyinstaller/tandem/               the app folder (run ./tandem)
#   packaging/dist/tandem-VERSION-linux-ARCH.tar.gz  that folder as tandem-VERSION/
#   packaging/dist/tandem_VERSION_DEBARCH.deb        /opt/tandem, /usr/bin/tandem, menu entry and icon
# Environment: PYTHON (default .venv/bin/python), TANDEM_TRITON_BACKENDS (see tandem.spec),
#   TANDEM_GZIP_LEVEL (1-9, default 6), TANDEM_DEB_COMPRESS (xz | gzip | zstd | none; default xz),
#   TANDEM_DEB_LEVEL (dpkg-deb -z level; default: dpkg-deb's own),
#   TANDEM_SKIP_DEB=1 / TANDEM_SKIP_TAR=1 to leave one out, TANDEM_REUSE_APP=1 to package the app folder
#   already in packaging/dist/pyinstaller (no PyInstaller run).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
BUILD="$ROOT/packaging/build"
DIST="$ROOT/packaging/dist"
APPDIR="$DIST/pyinstaller/tandem"
GZIP_LEVEL="${TANDEM_GZIP_LEVEL:-6}"
DEB_COMPRESS="${TANDEM_DEB_COMPRESS:-xz}"

say() { printf '\033[1m[tandem build]\033[0m %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }
elapsed() { echo "$((SECONDS - $1)) s"; }

[[ -x "$PY" ]] || die "no Python at $PY: run 'bash packaging/setup_env.sh setup' first (or set PYTHON)"
"$PY" -c 'import PyInstaller' 2>/dev/null \
    || die "PyInstaller is missing: $PY -m pip install -e '.[packaging]'"
VERSION="$("$PY" -c 'import re,sys; print(re.search(r"^version = \"([^\"]+)\"", open("pyproject.toml").read(), re.M).group(1))')"
ARCH="$(uname -m)"
mkdir -p "$BUILD" "$DIST"

# -- icons ----------------------------------------------------------------------------------------------------
"$PY" packaging/make_icons.py "$BUILD/icons" >&2

# -- PyInstaller one-folder app -------------------------------------------------------------------------------
t=$SECONDS
if [[ "${TANDEM_REUSE_APP:-0}" == 1 ]]; then
    [[ -x "$APPDIR/tandem" ]] || die "TANDEM_REUSE_APP=1 but there is no $APPDIR/tandem"
    say "reusing $APPDIR"
else
    say "PyInstaller: analysing and collecting (several minutes on 2 cores)"
    rm -rf "$APPDIR"
    TANDEM_ICON_DIR="$BUILD/icons" "$PY" -m PyInstaller --noconfirm --log-level WARN \
        --distpath "$DIST/pyinstaller" --workpath "$BUILD/pyinstaller" packaging/tandem.spec
    [[ -x "$APPDIR/tandem" ]] || die "PyInstaller did not produce $APPDIR/tandem"
    say "PyInstaller done in $(elapsed $t)"
fi

# Debug sections only (symbols and code stay): libtriton.so alone carries ~250 MB of DWARF.
t=$SECONDS
stripped=0
while IFS= read -r -d '' lib; do
    # (grep without -q reads all of readelf's output: -q would exit early, and pipefail would then see
    # readelf die of SIGPIPE and skip the file)
    if readelf -S "$lib" 2>/dev/null | grep '\.debug_info' >/dev/null; then
        strip --strip-debug "$lib" || die "strip failed on $lib"
        stripped=$((stripped + 1))
    fi
done < <(find "$APPDIR" -type f \( -name '*.so' -o -name '*.so.*' \) -print0)
say "stripped debug sections from $stripped libraries in $(elapsed $t)"
install -m 644 packaging/linux/README.installed "$APPDIR/README.txt"

# -- .tar.gz ----------------------------------------------------------------------------------------------------
TARBALL="$DIST/tandem-$VERSION-linux-$ARCH.tar.gz"
if [[ "${TANDEM_SKIP_TAR:-0}" != 1 ]]; then
    t=$SECONDS
    rm -f "$TARBALL"
    cp "$BUILD/icons/tandem-256.png" "$APPDIR/tandem.png"
    tar -C "$DIST/pyinstaller" --owner=0 --group=0 --numeric-owner --transform "s,^tandem,tandem-$VERSION," \
        -cf - tandem | gzip "-$GZIP_LEVEL" >"$TARBALL"
    say "wrote $TARBALL in $(elapsed $t)"
fi

# -- .deb ----------------------------------------------------------------------------------------------------
if [[ "${TANDEM_SKIP_DEB:-0}" != 1 ]]; then
    command -v dpkg-deb >/dev/null || die "dpkg-deb is missing (apt-get install dpkg), or set TANDEM_SKIP_DEB=1"
    t=$SECONDS
    DEBARCH="$(dpkg --print-architecture 2>/dev/null || echo amd64)"
    STAGE="$BUILD/deb/tandem_${VERSION}_$DEBARCH"
    DEB="$DIST/tandem_${VERSION}_$DEBARCH.deb"
    rm -rf "$STAGE" "$DEB"
    mkdir -p "$STAGE/DEBIAN" "$STAGE/opt" "$STAGE/usr/bin" "$STAGE/usr/share/applications" \
        "$STAGE/usr/share/doc/tandem" "$STAGE/usr/share/icons/hicolor/scalable/apps"
    cp -al "$APPDIR" "$STAGE/opt/tandem" 2>/dev/null || cp -a "$APPDIR" "$STAGE/opt/tandem"
    ln -s ../../opt/tandem/tandem "$STAGE/usr/bin/tandem"  # relative: works in a dpkg-deb -x tree too
    install -m 644 packaging/linux/tandem.desktop "$STAGE/usr/share/applications/tandem.desktop"
    install -m 644 resources/icons/tandem.svg "$STAGE/usr/share/icons/hicolor/scalable/apps/tandem.svg"
    for size in 16 32 48 64 128 256 512; do
        dir="$STAGE/usr/share/icons/hicolor/${size}x$size/apps"
        mkdir -p "$dir"
        install -m 644 "$BUILD/icons/tandem-$size.png" "$dir/tandem.png"
    done
    install -m 644 LICENSE "$STAGE/usr/share/doc/tandem/copyright"
    install -m 644 packaging/linux/README.installed "$STAGE/usr/share/doc/tandem/README"
    installed_kb="$(du -sk --exclude=DEBIAN "$STAGE" | cut -f1)"
    sed -e "s/@VERSION@/$VERSION/" -e "s/@ARCH@/$DEBARCH/" -e "s/@INSTALLED_SIZE@/$installed_kb/" \
        packaging/linux/control.in >"$STAGE/DEBIAN/control"
    install -m 755 packaging/linux/postinst "$STAGE/DEBIAN/postinst"
    install -m 755 packaging/linux/postinst "$STAGE/DEBIAN/postrm"
    case "$DEB_COMPRESS" in
        xz | gzip | zstd | none) ;;
        *) die "TANDEM_DEB_COMPRESS must be xz, gzip, zstd or none" ;;
    esac
    level=()
    [[ -n "${TANDEM_DEB_LEVEL:-}" ]] && level=(-z"$TANDEM_DEB_LEVEL")
    dpkg-deb --root-owner-group -Z"$DEB_COMPRESS" "${level[@]}" --build "$STAGE" "$DEB" >&2
    rm -rf "$STAGE"
    say "wrote $DEB in $(elapsed $t)"
fi

# -- sizes ----------------------------------------------------------------------------------------------------
say "sizes:"
printf '  %-48s %8s MiB\n' "app folder (packaging/dist/pyinstaller/tandem)" \
    "$(($(du -sb "$APPDIR" | cut -f1) / 1048576))" >&2
for f in "$DIST"/tandem-"$VERSION"-linux-"$ARCH".tar.gz "$DIST"/tandem_"$VERSION"_*.deb; do
    [[ -f "$f" ]] && printf '  %-48s %8s MiB\n' "${f#"$ROOT"/}" "$(($(stat -c %s "$f") / 1048576))" >&2
done
exit 0
