"""The one safetensors writer and the one reader behind every lora_jax file.

:func:`write` streams: the header first, then each tensor as it is produced, so at most one
tensor is on the host at a time. It writes to a temporary file beside the target and renames
it over the target only when complete (the temporary file is removed on any exception), with
the file mode the umask gives. Sharded arrays are gathered whole, across processes too: every
process calls :func:`write`; process 0 writes.

:func:`reading` opens a file and validates its header before any tensor is read, so a large
foreign file is refused by its metadata alone.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO, NamedTuple

import jax
import numpy as np
import safetensors
from jax.experimental import multihost_utils

DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}  # fmt: skip


class Tensor(NamedTuple):
    """One tensor to write: its name, shape and dtype, and how to produce its value."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    produce: Callable[[], Any]


CHECKSUMS = "lora_jax_crc32"  # "<metadata crc>:<tensor crc>,<tensor crc>,..." in hex, tensors by sorted name


def _metadata_crc(metadata: dict[str, str]) -> int:
    rest = {k: v for k, v in metadata.items() if k != CHECKSUMS}
    return zlib.crc32(json.dumps(rest, sort_keys=True).encode())


def to_host(x: Any) -> np.ndarray:
    """The whole array on the host, gathered from every device (and process) that holds a part."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)


def write(path: str | os.PathLike, tensors: Iterable[Tensor], metadata: dict[str, str], where: str) -> None:
    """Write ``tensors`` (in order) and ``metadata`` to ``path`` as one safetensors file, atomically.

    Raises:
      ValueError: if a dtype cannot be stored, a name repeats, or a produced array does not
        have its declared shape and dtype (nothing is written then).
    """
    tensors = list(tensors)
    header: dict[str, Any] = {}
    offset = 0
    for t in tensors:
        if t.dtype.name not in DTYPES:
            raise ValueError(f"{where}: {t.name!r} has dtype {t.dtype}, which safetensors cannot store.")
        if t.name in header:
            raise ValueError(f"{where}: two tensors are named {t.name!r}.")
        size = int(np.prod(t.shape, dtype=np.int64)) * t.dtype.itemsize
        header[t.name] = {
            "dtype": DTYPES[t.dtype.name],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    if CHECKSUMS in metadata:
        raise ValueError(f"{where}: the metadata key {CHECKSUMS!r} is lora_jax's own.")
    # Checksums: the metadata's CRC-32 now, each tensor's written in place (same width) once known.
    placeholder = ",".join(["00000000"] * len(tensors))
    header["__metadata__"] = {**metadata, CHECKSUMS: f"{_metadata_crc(metadata):08x}:{placeholder}"}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    slot = 8 + head.index(placeholder.encode()) if tensors else 0

    def body(f: BinaryIO | None) -> None:
        if f is not None:
            f.write(len(head).to_bytes(8, "little") + head)
        crcs = {}
        for t in tensors:
            value = to_host(t.produce())  # every process gathers
            value = np.ascontiguousarray(value).reshape(value.shape)  # (0-d stays 0-d)
            if value.shape != tuple(t.shape) or value.dtype != t.dtype:
                raise ValueError(
                    f"{where}: {t.name!r} was declared {t.dtype}{list(t.shape)}, "
                    f"produced {value.dtype}{list(value.shape)}."
                )
            if f is not None:
                data = value.tobytes()
                crcs[t.name] = f"{zlib.crc32(data):08x}"
                f.write(data)
        if f is not None and tensors:
            f.seek(slot)
            f.write(",".join(crcs[name] for name in sorted(crcs)).encode())
            f.seek(0, os.SEEK_END)

    if jax.process_index() == 0:
        atomic_write(path, body, where)
    else:
        body(None)


def atomic_write(path: str | os.PathLike, write_to: Callable[[BinaryIO], Any], where: str = "lora_jax") -> None:
    """Call ``write_to(file)`` on a temporary file next to ``path``, then rename it to ``path``
    (:func:`replacing`).

    Raises:
      ValueError: if ``path`` is empty or names a directory.
      OSError: (its own subclass) naming ``path`` if the directory is missing or not writable.
    """
    with replacing(path, where) as tmp, open(tmp, "wb") as f:
        write_to(f)


@contextlib.contextmanager
def replacing(path: str | os.PathLike, where: str = "lora_jax") -> Iterator[str]:
    """A temporary file's path next to ``path`` for the block to write (for writers that open
    a path themselves); when the block ends without error it is synced, given the mode the umask
    gives and renamed to ``path``; on any exception it is removed and ``path`` stays as it was.

    Raises:
      ValueError: if ``path`` is empty or names a directory.
      OSError: (its own subclass) naming ``path`` if the directory is missing or not writable.
    """
    path = user_path(path, where)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{where}: {path!r} is a directory; give the path of a file.")
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    except OSError as e:
        reason = "does not exist" if not os.path.isdir(directory) else f"cannot be written to ({e.strerror or e})"
        raise type(e)(f"{where}: cannot write {path!r}: the directory {directory!r} {reason}.") from None
    os.close(fd)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _remove_stale(directory, os.path.basename(path))


def _remove_stale(directory: str, name: str) -> None:
    """Remove the temporary files of earlier writes of ``name`` that were killed midway."""
    for stale in glob.glob(os.path.join(glob.escape(directory), f".{glob.escape(name)}.*.tmp")):
        with contextlib.suppress(OSError):
            os.unlink(stale)


def user_path(path: Any, where: str) -> str:
    """``path`` (a str, bytes or ``os.PathLike``) as a str; a clear error for anything else."""
    try:
        path = os.fsdecode(os.fspath(path))
    except TypeError:
        raise TypeError(f"{where}: expected a file path (str or os.PathLike), found {type(path).__name__}.") from None
    if not path:
        raise ValueError(f"{where}: the path is empty.")
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class Reader(NamedTuple):
    """An open safetensors file: its metadata and tensor names (read), tensors (on demand)."""

    where: str
    metadata: dict[str, str]
    names: list[str]
    get: Callable[[str], np.ndarray]


@contextlib.contextmanager
def reading(path: str | os.PathLike, function: str, what: str) -> Iterator[Reader]:
    """Open ``path``; a ``FileNotFoundError`` or a clear ``ValueError`` if it is not a readable
    safetensors file. ``Reader.where`` is ``"<function>: '<path>'"`` for messages."""
    path = user_path(path, function)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{function}: no {what} at {path!r}.")
    where = f"{function}: {path!r}"

    def corrupt(e: Exception) -> ValueError:
        size = os.path.getsize(path)
        return ValueError(f"{where} is not a readable safetensors file ({size} bytes; truncated or corrupt?): {e}")

    try:
        handle = safetensors.safe_open(path, framework="numpy")
    except (safetensors.SafetensorError, OSError, ValueError) as e:
        raise corrupt(e) from None
    with handle as f:
        metadata, names = f.metadata() or {}, list(f.keys())
        expected = _checksums(metadata, names, where)

        def get(name: str) -> np.ndarray:
            try:
                value = f.get_tensor(name)
            except (safetensors.SafetensorError, OSError, ValueError, TypeError, AttributeError) as e:
                raise corrupt(e) from None
            if expected is not None and zlib.crc32(np.ascontiguousarray(value).tobytes()) != expected[name]:
                raise ValueError(f"{where}: the tensor {name!r} fails its checksum (the file is corrupt).")
            return value

        yield Reader(where, metadata, names, get)


def _checksums(metadata: dict[str, str], names: list[str], where: str) -> dict[str, int] | None:
    """Each tensor's CRC-32 from a file lora_jax wrote (``None`` for other files), after
    checking the metadata's own."""
    if CHECKSUMS not in metadata:
        return None
    try:
        meta_crc, _, tensor_crcs = metadata[CHECKSUMS].partition(":")
        crcs = [int(c, 16) for c in tensor_crcs.split(",")] if tensor_crcs else []
        ok = int(meta_crc, 16) == _metadata_crc(metadata) and len(crcs) == len(names)
    except (ValueError, AttributeError):
        ok = False
    if not ok:
        raise ValueError(f"{where}: its metadata fails its checksum (the file is corrupt).")
    return dict(zip(sorted(names), crcs))
