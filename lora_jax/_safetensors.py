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
import json
import os
import tempfile
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
        }  # noqa: E501
        offset += size
    header["__metadata__"] = metadata
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)

    def body(f: BinaryIO | None) -> None:
        if f is not None:
            f.write(len(head).to_bytes(8, "little") + head)
        for t in tensors:
            value = to_host(t.produce())  # every process gathers
            value = np.ascontiguousarray(value).reshape(value.shape)  # (0-d stays 0-d)
            if value.shape != tuple(t.shape) or value.dtype != t.dtype:
                raise ValueError(
                    f"{where}: {t.name!r} was declared {t.dtype}{list(t.shape)}, "
                    f"produced {value.dtype}{list(value.shape)}."
                )
            if f is not None:
                f.write(value.tobytes())

    if jax.process_index() == 0:
        atomic_write(path, body)
    else:
        body(None)


def atomic_write(path: str | os.PathLike, write_to: Callable[[BinaryIO], Any]) -> None:
    """Call ``write_to(file)`` on a temporary file next to ``path``, then rename it to ``path``
    with the mode the umask gives; on any exception the temporary file is removed."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write_to(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
    path = os.fspath(path)
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

        def get(name: str) -> np.ndarray:
            try:
                return f.get_tensor(name)
            except (safetensors.SafetensorError, OSError, ValueError) as e:
                raise corrupt(e) from None

        yield Reader(where, f.metadata() or {}, list(f.keys()), get)
