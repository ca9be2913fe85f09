"""Value format of L2: a fixed header, then the (optionally compressed) payload.

Every value written to any L2 backend is::

    offset size field
    0      4    magic            b"AIKV"
    4      1    format version   FORMAT_VERSION
    5      1    flags            bit 0: payload is zstd-compressed
    6      2    header length    HEADER_SIZE (lets a later version grow the header)
    8      16   namespace digest (model, dtype, layout, TP size, ... see keys.Namespace)
    24     18   storage key      16-byte block key + 2-byte TP rank (keys.rank_key)
    42     2    reserved         zero
    44     8    payload length   bytes of the *decoded* payload
    52     8    stored length    bytes that follow the header (compressed size or = payload)
    60     8    checksum         xxh3-64 over header bytes [0, 60) + stored bytes
    68     ...  stored bytes

All integers little-endian. The checksum covers the header too, so a flipped
bit in a length or in the key is caught even if it still looks plausible.

:func:`decode` verifies everything *before* a single byte reaches the caller's
destination: a value that fails any check is reported as a miss with its
reason and the destination is left untouched.

Compression (zstd, per value, off by default) is adaptive: the compressed form
is kept only when it saves at least :data:`MIN_SAVING` of the payload, since
KV blocks of real models are mostly incompressible float noise and paying
decompression for a 2 % saving is a loss (docs/l2.md has the measurements).
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
import xxhash

from vllm_aibrix.core.keys import KEY_BYTES

MAGIC = b"AIKV"
FORMAT_VERSION = 1
FLAG_ZSTD = 0x01
STORAGE_KEY_BYTES = KEY_BYTES + 2  # keys.rank_key: key + uint16 rank
NAMESPACE_BYTES = 16

# magic, version, flags, header_len, namespace, storage key, reserved,
# payload_len, stored_len  -- the checksum follows and is packed separately.
_PREFIX = struct.Struct("<4sBBH16s18sHQQ")
_CHECKSUM = struct.Struct("<Q")
HEADER_SIZE = _PREFIX.size + _CHECKSUM.size  # 68
assert HEADER_SIZE == 68

# Keep a compressed payload only if it is at least this much smaller.
MIN_SAVING = 0.125
ZSTD_LEVEL = 1  # level 1: ~GB/s class speed; higher levels gain little on KV

_zstd: Any
try:  # optional dependency (extra "zstd")
    import zstandard as _zstd
except ImportError:  # pragma: no cover - exercised only without the extra
    _zstd = None


class DecodeStatus(Enum):
    """Why a value was (not) accepted."""

    OK = "ok"
    BAD_MAGIC = "bad_magic"
    BAD_VERSION = "bad_version"
    BAD_HEADER = "bad_header"  # header length / reserved bits / flags make no sense
    WRONG_NAMESPACE = "wrong_namespace"
    WRONG_KEY = "wrong_key"
    BAD_LENGTH = "bad_length"  # truncated, trailing bytes, or not the size the caller expects
    BAD_CHECKSUM = "bad_checksum"
    DECOMPRESS_ERROR = "decompress_error"


class CodecError(ValueError):
    """Raised by :func:`encode` for arguments that cannot be encoded."""


@dataclass(frozen=True)
class Encoded:
    """An encoded value as two parts, so the payload need not be copied.

    Backends that can send a vector of buffers (Redis, disk) write ``header``
    and ``body`` back to back; others join them (:meth:`joined`).
    """

    header: bytes
    body: memoryview

    @property
    def nbytes(self) -> int:
        return len(self.header) + self.body.nbytes

    def joined(self) -> bytes:
        return self.header + self.body


def as_byte_view(buf: Any) -> memoryview:
    """A flat, writable-if-possible ``uint8`` memoryview over a buffer or CPU tensor."""
    if isinstance(buf, torch.Tensor):
        if buf.device.type != "cpu":
            raise CodecError("L2 codec works on CPU tensors; copy to host first")
        if not buf.is_contiguous():
            raise CodecError("tensor must be contiguous")
        arr: Any = buf.view(torch.uint8).reshape(-1).numpy()
        return memoryview(arr).cast("B")
    mv = buf if isinstance(buf, memoryview) else memoryview(buf)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


def zstd_available() -> bool:
    return _zstd is not None


def encode(
    namespace_digest: bytes,
    storage_key: bytes,
    payload: Any,
    *,
    compress: bool = False,
) -> Encoded:
    """Encode ``payload`` (bytes-like or CPU tensor) for ``storage_key``.

    Without compression the payload is not copied: ``Encoded.body`` is a view
    of it, so the caller must keep it unchanged until the value is written.
    """
    if len(namespace_digest) != NAMESPACE_BYTES:
        raise CodecError(f"namespace digest must be {NAMESPACE_BYTES} bytes")
    if len(storage_key) != STORAGE_KEY_BYTES:
        raise CodecError(f"storage key must be {STORAGE_KEY_BYTES} bytes (keys.rank_key)")
    body = as_byte_view(payload)
    payload_len = body.nbytes
    flags = 0
    if compress:
        if _zstd is None:
            raise CodecError("compression requested but the 'zstandard' package is missing")
        packed = _compressor().compress(body)
        if len(packed) <= payload_len * (1.0 - MIN_SAVING):
            body = memoryview(packed)
            flags |= FLAG_ZSTD
    prefix = _PREFIX.pack(
        MAGIC,
        FORMAT_VERSION,
        flags,
        HEADER_SIZE,
        namespace_digest,
        storage_key,
        0,
        payload_len,
        body.nbytes,
    )
    h = xxhash.xxh3_64(prefix)
    h.update(body)
    return Encoded(prefix + _CHECKSUM.pack(h.intdigest()), body)


@dataclass(frozen=True)
class Header:
    """The parsed fixed header of a value."""

    version: int
    flags: int
    namespace_digest: bytes
    storage_key: bytes
    payload_len: int
    stored_len: int
    checksum: int


def parse_header(value: Any) -> Header | DecodeStatus:
    """Parse and sanity-check the header only (no checksum)."""
    mv = as_byte_view(value)
    if mv.nbytes < HEADER_SIZE:
        # Even the magic may be missing: call it truncated only if what is there matches.
        truncated = MAGIC.startswith(bytes(mv[:4]))
        return DecodeStatus.BAD_LENGTH if truncated else DecodeStatus.BAD_MAGIC
    magic, version, flags, hlen, ns, skey, reserved, payload_len, stored_len = _PREFIX.unpack_from(
        mv
    )
    if magic != MAGIC:
        return DecodeStatus.BAD_MAGIC
    if version != FORMAT_VERSION:
        return DecodeStatus.BAD_VERSION
    if hlen != HEADER_SIZE or reserved != 0 or flags & ~FLAG_ZSTD:
        return DecodeStatus.BAD_HEADER
    (checksum,) = _CHECKSUM.unpack_from(mv, _PREFIX.size)
    return Header(version, flags, ns, skey, payload_len, stored_len, checksum)


def decode_into(
    value: Any,
    namespace_digest: bytes,
    storage_key: bytes,
    dst: Any,
) -> DecodeStatus:
    """Verify ``value`` and copy its payload into ``dst`` (exactly its size).

    Returns :attr:`DecodeStatus.OK` after a successful copy, otherwise the
    first check that failed; on failure ``dst`` is not written.
    """
    if value is None:
        return DecodeStatus.BAD_LENGTH
    mv = as_byte_view(value)
    hdr = parse_header(mv)
    if isinstance(hdr, DecodeStatus):
        return hdr
    if hdr.namespace_digest != namespace_digest:
        return DecodeStatus.WRONG_NAMESPACE
    if hdr.storage_key != storage_key:
        return DecodeStatus.WRONG_KEY
    out = as_byte_view(dst)
    if mv.nbytes != HEADER_SIZE + hdr.stored_len or hdr.payload_len != out.nbytes:
        return DecodeStatus.BAD_LENGTH
    compressed = bool(hdr.flags & FLAG_ZSTD)
    if not compressed and hdr.stored_len != hdr.payload_len:
        return DecodeStatus.BAD_LENGTH
    h = xxhash.xxh3_64(mv[: _PREFIX.size])
    body = mv[HEADER_SIZE:]
    h.update(body)
    if h.intdigest() != hdr.checksum:
        return DecodeStatus.BAD_CHECKSUM
    if compressed:
        if _zstd is None:
            return DecodeStatus.DECOMPRESS_ERROR
        try:
            raw = _decompressor().decompress(body, max_output_size=hdr.payload_len)
        except _zstd.ZstdError:
            return DecodeStatus.DECOMPRESS_ERROR
        if len(raw) != hdr.payload_len:
            return DecodeStatus.DECOMPRESS_ERROR
        out[:] = raw
    else:
        out[:] = body
    return DecodeStatus.OK


# zstd (de)compressor objects are not thread-safe; keep one per thread.
_tls = threading.local()


def _compressor() -> Any:
    c = getattr(_tls, "cctx", None)
    if c is None:
        assert _zstd is not None
        c = _tls.cctx = _zstd.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
    return c


def _decompressor() -> Any:
    d = getattr(_tls, "dctx", None)
    if d is None:
        assert _zstd is not None
        d = _tls.dctx = _zstd.ZstdDecompressor()
    return d
