"""Warm-restore snapshots of the KV cache (DESIGN.md, "Snapshots").

After an assistant turn, `SnapshotStore.save(session)` writes the cache's valid prefix (positions
[0, n) of every K/V store, in the cache's own types, plus the K smoothing and equalization vectors)
to one file.
`restore(session, prompt_ids)` later loads the snapshot sharing the longest token prefix with the
prompt, so reopening or continuing a chat skips that part of the prefill.

A snapshot is only used when its fingerprint equals the session's: format version, model identity,
K/V types, K rotation (seed, group, sign vectors), K smoothing, K equalization (its recipe),
attention sinks kept in f16 (how many),
layer/head layout, chat template, which cache it is (the target's or a draft model's) and how K/V
were computed (device, CPU weight mode: the same tokens give slightly different K/V bits through
another kernel, and a restored greedy run must give exactly the tokens of a cold one).
Restoring rotated K into an unrotated cache (or the reverse) would silently give garbage attention,
so any difference means "not usable". The file name starts with a hash of the fingerprint, so a
restore only opens files made under the same settings.

File layout (every byte is covered by a checksum; a damaged or truncated file is deleted):
  magic b"TANDEMKV" | u64 header length | sha256 of the header | header (JSON, utf-8)
  | token ids (int32 little-endian, n_tokens of them) | payload (tensors, 64-byte aligned)
The header holds the fingerprint, n_tokens, the tokens' sha256, the payload's size and sha256,
and the tensor table [name, dtype, shape, offset]. Per layer l the payload has k.l.qs, k.l.d,
k.l.m, v.l.qs, ... (whichever the type has), each (n_kv, n_tokens, X), k_mean.l (n_kv, D)
when smoothing is on, k_scale.l (n_kv, D) when K equalization is on, and k_sink.l / v_sink.l
(n_kv, min(S, n_tokens), D) float16 when the cache keeps S attention-sink positions in f16.

The store works on any cache owner with these attributes (engine.session.Session, and
engine.drafters.DraftModelDrafter for the draft model's own cache): `cache` (KVCache), `cached_ids`
(tokens at positions 0..n-1), `gguf_file`, `template` (the target's chat template), `snapshot_role`
("target" | "draft") and `compute_identity` (e.g. "cpu/fast", "cuda").
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine import k_equalize

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MAGIC = b"TANDEMKV"
SUFFIX = ".tkv"
DEFAULT_BUDGET_BYTES = 4 * 2**30
_PREFIX = struct.Struct("<8sQ32s")  # magic, header length, sha256 of the header bytes
_ALIGN = 64  # payload tensors start on 64-byte boundaries (aligned torch.frombuffer views)
_SAMPLE_WINDOWS = 16  # model-data windows hashed into the model identity ...
_SAMPLE_BYTES = 64 * 1024  # ... of 64 KiB each: 1 MiB read once per model file
_STALE_TEMP_S = 3600  # a temp file this old was left by a crashed write
_EXPLAIN_MAX_FILES = 32  # other-settings files whose mismatch restore() logs (the most recent ones)
_DTYPES = {str(t).removeprefix("torch."): t for t in (torch.float16, torch.bfloat16, torch.float32,
                                                      torch.int8, torch.uint8)}
_data_sample_cache: dict[tuple, str] = {}


class _Corrupt(Exception):
    """The file is damaged or truncated: delete it."""


def default_directory() -> Path:
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("tandem", "tandem")) / "snapshots"


def _model_data_sha256(gguf_file) -> str:
    """sha256 of 16 windows spread over the tensor data.

    The GGUF header alone does not identify a model: two files with the same architecture, shapes,
    types and metadata (a re-quantization, a fine-tune with an unchanged header) have equal headers.
    """
    path, start, size = Path(gguf_file.path), int(gguf_file.data_offset), int(gguf_file.file_size)
    key = (str(path.resolve()), size, start, path.stat().st_mtime_ns)
    if key not in _data_sample_cache:
        digest = hashlib.sha256()
        span = max(0, size - start - _SAMPLE_BYTES)
        with open(path, "rb") as f:
            for i in range(_SAMPLE_WINDOWS):
                f.seek(start + span * i // max(1, _SAMPLE_WINDOWS - 1))
                digest.update(f.read(_SAMPLE_BYTES))
        _data_sample_cache[key] = digest.hexdigest()
    return _data_sample_cache[key]


def fingerprint(session) -> dict:
    """Everything a snapshot's K/V bytes depend on, besides the tokens themselves (session: a cache owner)."""
    cache = session.cache
    rotation = cache.rotation
    signs = None
    if rotation is not None:
        s = torch.stack([rotation.s1, rotation.s2]).to("cpu", torch.float32).contiguous()  # (2, G)
        signs = hashlib.sha256(s.numpy().tobytes()).hexdigest()
    return {
        "format_version": FORMAT_VERSION,
        "model_file_size": int(session.gguf_file.file_size),
        "model_header_sha256": session.gguf_file.header_sha256(),
        "model_data_sample_sha256": _model_data_sha256(session.gguf_file),
        "k_type": cache.k_type,
        "v_type": cache.v_type,
        "k_rotated": rotation is not None,
        "rotation_seed": None if rotation is None else int(rotation.seed),
        "rotation_group": None if rotation is None else int(rotation.group),
        "rotation_signs_sha256": signs,
        "k_smooth": bool(cache.k_smooth),
        "k_equalize": k_equalize.RECIPE if cache.k_equalize else None,
        "sink_tokens": int(getattr(cache, "sink_tokens", 0)),
        "n_layers": len(cache.k),
        "n_kv_heads": int(cache.n_kv_heads),
        "head_dim": int(cache.head_dim),
        "chat_template_sha256": session.template.sha256,
        "cache_role": session.snapshot_role,
        "compute": session.compute_identity,
    }


def _fingerprint_key(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def _tokens_bytes(ids: list[int]) -> bytes:
    return np.asarray(ids, dtype="<i4").tobytes()


def _differences(have: dict, want: dict) -> str:
    """The fields that differ; a field one side lacks (another engine version) shows as <absent>."""
    absent = "<absent>"
    keys = sorted(set(have) | set(want))
    shown = [(k, have.get(k, absent), want.get(k, absent)) for k in keys]
    return ", ".join(f"{k} {a!r} (session: {b!r})" for k, a, b in shown if a != b)


def _common_prefix(a: np.ndarray, b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differ = np.flatnonzero(a[:n] != np.asarray(b[:n], dtype=np.int64))
    return int(differ[0]) if len(differ) else n


@dataclass
class _Head:
    header: dict
    tokens: np.ndarray  # (n_tokens,) int64
    payload_offset: int


def _read_head(path: Path) -> _Head:
    """Header and token ids, checked against their hashes and the file size. Raises _Corrupt."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(_PREFIX.size)
        if len(prefix) < _PREFIX.size:
            raise _Corrupt(f"{size} bytes, shorter than the fixed prefix")
        magic, header_len, header_sha = _PREFIX.unpack(prefix)
        if magic != MAGIC:
            raise _Corrupt("not a Tandem snapshot (bad magic)")
        if _PREFIX.size + header_len > size:
            raise _Corrupt("truncated header")
        raw = f.read(header_len)
        if hashlib.sha256(raw).digest() != header_sha:
            raise _Corrupt("header checksum mismatch")
        header = json.loads(raw)
        n_tokens, payload_bytes = int(header["n_tokens"]), int(header["payload_bytes"])
        payload_offset = _PREFIX.size + header_len + 4 * n_tokens
        if size != payload_offset + payload_bytes:
            raise _Corrupt(f"size {size} bytes, expected {payload_offset + payload_bytes} (truncated?)")
        token_raw = f.read(4 * n_tokens)
    if hashlib.sha256(token_raw).hexdigest() != header["tokens_sha256"]:
        raise _Corrupt("token checksum mismatch")
    tokens = np.frombuffer(token_raw, dtype="<i4").astype(np.int64)  # (n_tokens,)
    return _Head(header, tokens, payload_offset)


class SnapshotStore:
    """A directory of KV snapshots with a size budget and least-recently-used eviction."""

    def __init__(self, directory: Path | str | None = None, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> None:
        self.directory = Path(directory) if directory is not None else default_directory()
        self.budget_bytes = int(budget_bytes)

    # -- bookkeeping ---------------------------------------------------------------------------------
    def _files(self, pattern: str = f"*{SUFFIX}") -> list[Path]:
        if not self.directory.is_dir():
            return []
        return [p for p in self.directory.glob(pattern) if p.is_file()]

    def total_bytes(self) -> int:
        return sum(_size(p) for p in self._files())

    def clear(self) -> tuple[int, int]:
        """Delete every snapshot (and temp file) in the directory; return (files deleted, bytes freed)."""
        files, freed = 0, 0
        for path in self._files() + self._files(".*.tmp"):
            size = _size(path)
            if _remove(path):
                files, freed = files + 1, freed + size
        if files:
            log.info("cleared %d snapshot files (%d bytes) from %s", files, freed, self.directory)
        return files, freed

    def _discard(self, path: Path, why: str) -> None:
        log.warning("snapshot %s is damaged (%s); deleted it, the chat will prefill normally", path.name, why)
        _remove(path)

    def _heads(self, pattern: str) -> list[tuple[Path, _Head]]:
        """Readable heads of the files matching pattern; damaged files are deleted on the way."""
        heads = []
        for path in self._files(pattern):
            try:
                heads.append((path, _read_head(path)))
            except FileNotFoundError:
                continue  # evicted meanwhile
            except (_Corrupt, ValueError, KeyError, TypeError) as exc:
                self._discard(path, str(exc) or type(exc).__name__)
            except OSError as exc:
                log.info("snapshot %s cannot be read: %s", path.name, exc)
        return heads

    # -- save --------------------------------------------------------------------------------------------
    def save(self, session) -> Path | None:
        """Write the cache's valid prefix (session.cached_ids); return the file, or None if not saved."""
        ids = [int(t) for t in session.cached_ids]
        n = len(ids)
        if n == 0:
            return None
        cache = session.cache
        fp = fingerprint(session)
        parts: list[tuple[str, torch.Tensor]] = []
        for layer in range(len(cache.k)):
            for side, store in (("k", cache.k[layer]), ("v", cache.v[layer])):
                for field in ("qs", "d", "m"):
                    t = getattr(store, field)
                    if t is not None:
                        parts.append((f"{side}.{layer}.{field}", t.narrow(1, 0, n)))  # (n_kv, n, X)
            if cache.k_smooth:
                if cache.k_mean[layer] is None:
                    log.info("not saving a snapshot: layer %d has no K smoothing vector yet", layer)
                    return None
                parts.append((f"k_mean.{layer}", cache.k_mean[layer]))  # (n_kv, D) float32
            if cache.k_equalize:
                if cache.k_scale[layer] is None:
                    log.info("not saving a snapshot: layer %d has no K equalization scales yet", layer)
                    return None
                parts.append((f"k_scale.{layer}", cache.k_scale[layer]))  # (n_kv, D) float32
            for side, sinks in _sink_stores(cache):
                parts.append((f"{side}_sink.{layer}", sinks[layer].narrow(1, 0, min(n, cache.sink_tokens))))
        table, blobs, offset = [], [], 0
        payload_sha = hashlib.sha256()
        for name, t in parts:
            t = t.detach().to("cpu").contiguous()
            raw = t.reshape(-1).view(torch.uint8).numpy()  # (nbytes,) a view, no copy
            pad = -offset % _ALIGN
            if pad:
                blobs.append(bytes(pad))
                payload_sha.update(bytes(pad))
                offset += pad
            table.append([name, str(t.dtype).removeprefix("torch."), list(t.shape), offset])
            blobs.append(raw)
            payload_sha.update(raw)
            offset += raw.nbytes
        token_raw = _tokens_bytes(ids)
        header = {
            "format_version": FORMAT_VERSION, "fingerprint": fp, "n_tokens": n,
            "tokens_sha256": hashlib.sha256(token_raw).hexdigest(), "payload_bytes": offset,
            "payload_sha256": payload_sha.hexdigest(), "tensors": table, "created_unix": time.time(),
        }
        header_raw = json.dumps(header, sort_keys=True).encode()
        total = _PREFIX.size + len(header_raw) + len(token_raw) + offset
        if total > self.budget_bytes:
            log.info("not saving a %d-byte snapshot: over the %d-byte budget", total, self.budget_bytes)
            return None
        key = _fingerprint_key(fp)
        path = self.directory / f"{key}-{header['tokens_sha256'][:24]}{SUFFIX}"
        temp = self.directory / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        started = time.perf_counter()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with open(temp, "wb") as f:
                f.write(_PREFIX.pack(MAGIC, len(header_raw), hashlib.sha256(header_raw).digest()))
                f.write(header_raw)
                f.write(token_raw)
                for blob in blobs:
                    f.write(blob)
            os.replace(temp, path)  # atomic: a reader sees the old file or the whole new one
        except OSError as exc:
            log.warning("could not save a snapshot to %s: %s", self.directory, exc)
            _remove(temp)
            return None
        log.info("saved snapshot %s: %d tokens, %.1f MB in %.3f s", path.name, n, total / 1e6,
                 time.perf_counter() - started)
        self._drop_superseded(key, path, ids)
        self._evict(keep=path)
        return path

    def _drop_superseded(self, key: str, path: Path, ids: list[int]) -> None:
        """A same-settings snapshot whose tokens are a strict prefix of ids is covered by the new one."""
        for other, head in self._heads(f"{key}-*{SUFFIX}"):
            n = len(head.tokens)
            if other != path and n < len(ids) and _common_prefix(head.tokens, ids) == n:
                log.info("snapshot %s is superseded by %s; deleted it", other.name, path.name)
                _remove(other)

    def _evict(self, keep: Path) -> None:
        now = time.time()
        for temp in self._files(".*.tmp"):
            try:
                if now - temp.stat().st_mtime > _STALE_TEMP_S:
                    _remove(temp)
            except OSError:
                pass
        files = []
        for p in self._files():
            try:
                st = p.stat()
            except OSError:
                continue
            files.append((st.st_mtime_ns, st.st_size, p))
        total = sum(size for _, size, _ in files)
        for _, size, p in sorted(files, key=lambda f: f[0]):  # least recently used first
            if total <= self.budget_bytes:
                break
            if p == keep:
                continue
            log.info("snapshot budget %d bytes exceeded; evicting least recently used %s",
                     self.budget_bytes, p.name)
            _remove(p)
            total -= size

    # -- restore ------------------------------------------------------------------------------------------
    def restore(self, session, prompt_ids: list[int]) -> int:
        """Load the usable snapshot sharing the longest prefix with prompt_ids into session.cache.

        Returns how many tokens it restored (session.cached_ids = prompt_ids[:that]), or 0 when no
        snapshot beats what the session's cache already holds. At least one prompt token is left to run.
        """
        limit = min(len(prompt_ids) - 1, session.cache.max_len)
        already = min(_common_prefix(np.asarray(session.cached_ids, dtype=np.int64), prompt_ids), limit)
        if limit <= already or not self.directory.is_dir():
            return 0
        fp = fingerprint(session)
        key = _fingerprint_key(fp)
        candidates = []
        for path, head in self._heads(f"{key}-*{SUFFIX}"):
            if head.header.get("fingerprint") != fp:  # a hash collision or a hand-made file name
                why = _differences(head.header.get("fingerprint") or {}, fp)
                log.info("snapshot %s not usable: %s", path.name, why)
                continue
            usable = min(_common_prefix(head.tokens, prompt_ids), limit)
            if usable > already:
                candidates.append((usable, path, head))
        if not candidates:
            self._explain_misses(key, fp, prompt_ids, already)
            return 0
        for usable, path, head in sorted(candidates, key=lambda c: -c[0]):
            started = time.perf_counter()
            try:
                self._load(path, head, session, usable)
            except FileNotFoundError:
                continue
            except (_Corrupt, ValueError, KeyError, TypeError) as exc:
                self._discard(path, str(exc) or type(exc).__name__)
                continue
            except OSError as exc:
                log.info("snapshot %s cannot be read: %s", path.name, exc)
                continue
            session.cached_ids = [int(t) for t in prompt_ids[:usable]]
            _touch(path)
            log.info("restored %d of %d prompt tokens from snapshot %s in %.3f s", usable, len(prompt_ids),
                     path.name, time.perf_counter() - started)
            return usable
        return 0

    def _explain_misses(self, key: str, fp: dict, prompt_ids: list[int], already: int) -> None:
        """Log why snapshots of this conversation made under other settings are not used."""
        others = [p for p in self._files() if not p.name.startswith(key + "-")]
        for path in sorted(others, key=_mtime, reverse=True)[:_EXPLAIN_MAX_FILES]:
            try:
                head = _read_head(path)
            except (OSError, _Corrupt, ValueError, KeyError, TypeError):
                continue  # other settings' files are checked when those settings are in use
            if _common_prefix(head.tokens, prompt_ids) > already:
                why = _differences(head.header.get("fingerprint") or {}, fp)
                log.info("snapshot %s matches the prompt but is not usable: %s", path.name, why)

    @staticmethod
    def _load(path: Path, head: _Head, session, usable: int) -> None:
        """Check the payload's checksum and layout, then copy positions [0, usable) into the cache."""
        header = head.header
        n, size = int(header["n_tokens"]), int(header["payload_bytes"])
        buf = bytearray(size)
        with open(path, "rb") as f:
            f.seek(head.payload_offset)
            got = f.readinto(buf)
        if got != size:
            raise _Corrupt(f"payload truncated at {got} of {size} bytes")
        if hashlib.sha256(buf).hexdigest() != header["payload_sha256"]:
            raise _Corrupt("payload checksum mismatch")
        tensors = {}
        for name, dtype, shape, offset in header["tensors"]:
            count = int(np.prod(shape)) if shape else 1
            t = torch.frombuffer(buf, dtype=_DTYPES[dtype], count=count, offset=int(offset)) if count else \
                torch.empty(0, dtype=_DTYPES[dtype])
            tensors[name] = t.reshape(shape)
        cache = session.cache
        copies: list[tuple[torch.Tensor, torch.Tensor]] = []  # (destination, source), checked first
        for layer in range(len(cache.k)):
            for side, store in (("k", cache.k[layer]), ("v", cache.v[layer])):
                for field in ("qs", "d", "m"):
                    dest = getattr(store, field)
                    if dest is None:
                        continue
                    src = tensors[f"{side}.{layer}.{field}"]  # (n_kv, n, X)
                    want = (dest.shape[0], n, *dest.shape[2:])
                    if tuple(src.shape) != want or src.dtype != dest.dtype:
                        raise _Corrupt(f"{side}.{layer}.{field} is {tuple(src.shape)} {src.dtype}, "
                                       f"the cache needs {want} {dest.dtype}")
                    copies.append((dest.narrow(1, 0, usable), src.narrow(1, 0, usable)))
            for side, sinks in _sink_stores(cache):
                src, dest = tensors[f"{side}_sink.{layer}"], sinks[layer]  # (n_kv, min(S, n), D) float16
                want = (dest.shape[0], min(n, dest.shape[1]), dest.shape[2])
                if tuple(src.shape) != want or src.dtype != dest.dtype:
                    raise _Corrupt(f"{side}_sink.{layer} is {tuple(src.shape)} {src.dtype}, "
                                   f"the cache needs {want} {dest.dtype}")
                keep = min(usable, want[1])
                copies.append((dest.narrow(1, 0, keep), src.narrow(1, 0, keep)))
        means = _per_layer_vectors(tensors, "k_mean", cache) if cache.k_smooth else [None] * len(cache.k)
        scales = _per_layer_vectors(tensors, "k_scale", cache) if cache.k_equalize else [None] * len(cache.k)
        for dest, src in copies:
            dest.copy_(src)
        if cache.k_smooth:
            device = cache.k[0].qs.device
            cache.k_mean = [m.to(device) for m in means]
        if cache.k_equalize:
            cache.k_scale = [s.to(cache.k[0].qs.device) for s in scales]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _remove(path: Path) -> bool:
    """Delete path; True when this call deleted it."""
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False
    except OSError as exc:
        log.warning("could not delete %s: %s", path, exc)
        return False


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def _touch(path: Path) -> None:
    try:
        os.utime(path)  # the mtime is the LRU clock
    except OSError:
        pass


def _sink_stores(cache) -> list[tuple[str, list[torch.Tensor]]]:
    """("k" | "v", per-layer (n_kv, S, D) float16 sink copies) for each side that keeps them."""
    sides = (("k", getattr(cache, "k_sink", None)), ("v", getattr(cache, "v_sink", None)))
    return [(side, sinks) for side, sinks in sides if sinks is not None]


def _per_layer_vectors(tensors: dict, prefix: str, cache) -> list[torch.Tensor | None]:
    """The stored per-layer (n_kv, D) float32 vectors `prefix.{layer}` (smoothing means, K scales)."""
    out: list[torch.Tensor | None] = []
    for layer in range(len(cache.k)):
        vec = tensors[f"{prefix}.{layer}"]  # (n_kv, D) float32
        if tuple(vec.shape) != (cache.n_kv_heads, cache.head_dim) or vec.dtype != torch.float32:
            raise _Corrupt(f"{prefix}.{layer} is {tuple(vec.shape)} {vec.dtype}")
        out.append(vec.clone())
    return out
