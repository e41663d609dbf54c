"""Render resources/icons/tandem.svg into the icon files each installer needs, with Qt only.

    python packaging/make_icons.py OUT_DIR

writes OUT_DIR/tandem-{16..512}.png (Linux hicolor theme, .deb), OUT_DIR/tandem.ico (Windows: the
executable and Inno Setup) and OUT_DIR/tandem.icns (macOS .app). Qt's SVG renderer draws each size;
the ICO and ICNS containers are written here with PNG entries (Qt's own writers store only the first
image), so no Pillow and no iconutil.
"""

from __future__ import annotations

import os
import struct
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SVG = ROOT / "resources" / "icons" / "tandem.svg"
PNG_SIZES = (16, 32, 48, 64, 128, 256, 512)
ICO_SIZES = (16, 32, 48, 256)  # what Windows Explorer and Inno Setup ask for
# ICNS element types holding PNG data, by pixel size (the @2x types reuse the bigger renderings)
ICNS_TYPES = (
    (b"icp4", 16),
    (b"icp5", 32),
    (b"icp6", 64),
    (b"ic07", 128),
    (b"ic08", 256),
    (b"ic09", 512),
    (b"ic11", 32),
    (b"ic12", 64),
    (b"ic13", 256),
    (b"ic14", 512),
)


def render(renderer, size: int):  # noqa: ANN001, ANN201 - Qt types are imported lazily
    from PySide6.QtCore import Qt
    from PySide6.QtGui import QImage, QPainter

    image = QImage(size, size, QImage.Format_ARGB32)
    image.fill(Qt.transparent)
    painter = QPainter(image)
    painter.setRenderHint(QPainter.Antialiasing)
    renderer.render(painter)
    painter.end()
    return image


def png_bytes(image) -> bytes:  # noqa: ANN001
    from PySide6.QtCore import QBuffer, QIODevice

    buf = QBuffer()
    buf.open(QIODevice.WriteOnly)
    if not image.save(buf, "PNG"):
        raise SystemExit("PNG encoding failed")
    return bytes(buf.data())


def ico_bytes(pngs: dict[int, bytes]) -> bytes:
    """An ICO file: 6-byte header, one 16-byte directory entry per size, then the PNG images."""
    sizes = sorted(pngs)
    header = struct.pack("<HHH", 0, 1, len(sizes))
    offset = len(header) + 16 * len(sizes)
    entries, blobs = b"", b""
    for size in sizes:
        data = pngs[size]
        dim = 0 if size >= 256 else size  # 0 means 256
        entries += struct.pack("<BBBBHHII", dim, dim, 0, 0, 1, 32, len(data), offset + len(blobs))
        blobs += data
    return header + entries + blobs


def icns_bytes(pngs: dict[int, bytes]) -> bytes:
    """An ICNS file: 'icns' + total length, then (type, length incl. its 8-byte header, PNG) elements."""
    body = b"".join(kind + struct.pack(">I", 8 + len(pngs[size])) + pngs[size] for kind, size in ICNS_TYPES)
    return b"icns" + struct.pack(">I", 8 + len(body)) + body


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtGui import QGuiApplication
    from PySide6.QtSvg import QSvgRenderer

    app = QGuiApplication.instance() or QGuiApplication([])  # noqa: F841 - image plugins need one
    renderer = QSvgRenderer(str(SVG))
    if not renderer.isValid():
        raise SystemExit(f"{SVG} is not a valid SVG")
    sizes = sorted(set(PNG_SIZES + ICO_SIZES + tuple(size for _, size in ICNS_TYPES)))
    pngs = {size: png_bytes(render(renderer, size)) for size in sizes}
    for size in PNG_SIZES:
        (out / f"tandem-{size}.png").write_bytes(pngs[size])
    (out / "tandem.ico").write_bytes(ico_bytes({size: pngs[size] for size in ICO_SIZES}))
    (out / "tandem.icns").write_bytes(icns_bytes(pngs))
    print(f"icons written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
