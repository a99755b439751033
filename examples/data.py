"""Two text domains that exist offline on every machine: the Python standard library's
docstrings (English prose) and its source code (Python), as bytes for a byte-level LM.

The code is the stdlib's own modules with docstrings removed and normalised by
``ast.unparse`` (no comments), so the two domains share no text. Files are split into
train and held-out parts by a hash of their name, so held-out code comes from modules the
model never saw.
"""

from __future__ import annotations

import ast
import os
import sysconfig
import zlib

import numpy as np

_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__", "turtledemo", "ensurepip"}


def stdlib_files() -> list[str]:
    """The standard library's ``.py`` files, in a fixed order."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for directory, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        files += [os.path.join(directory, n) for n in sorted(names) if n.endswith(".py")]
    return files


def _parse(path: str) -> ast.Module | None:
    try:
        with open(path, encoding="utf-8") as f:
            return ast.parse(f.read())
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return None


def _held_out(path: str) -> bool:
    return zlib.crc32(os.path.basename(path).encode()) % 8 == 0


def corpora(max_bytes: int) -> dict[str, bytes]:
    """``{'prose_train', 'prose_test', 'code_train', 'code_test'}``, each at most ``max_bytes``.

    Test parts are at most a quarter of ``max_bytes``.
    """
    parts: dict[str, list[str]] = {k: [] for k in ("prose_train", "prose_test", "code_train", "code_test")}
    limits = {k: max_bytes // (4 if k.endswith("test") else 1) for k in parts}
    sizes = dict.fromkeys(parts, 0)
    for path in stdlib_files():
        if all(sizes[k] >= limits[k] for k in parts):
            break
        tree = _parse(path)
        if tree is None:
            continue
        split = "test" if _held_out(path) else "train"
        docs = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc is not None:
                    if len(doc) > 80:
                        docs.append(doc)
                    node.body = node.body[1:] or [ast.Pass()]  # drop the docstring from the code
        try:
            code = ast.unparse(tree)
        except (ValueError, RecursionError):
            continue
        for domain, text in (("prose", "\n\n".join(docs)), ("code", code)):
            key = f"{domain}_{split}"
            if text and sizes[key] < limits[key]:
                parts[key].append(text)
                sizes[key] += len(text)
    return {k: "\n\n".join(v).encode("utf-8")[: limits[k]] for k, v in parts.items()}


def batches(data: bytes, batch: int, length: int, seed: int):
    """Endless random windows of ``length`` bytes, as int32 token arrays ``(batch, length)``."""
    tokens = np.frombuffer(data, np.uint8).astype(np.int32)
    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, len(tokens) - length, batch)
        yield np.stack([tokens[s : s + length] for s in starts])


def eval_batches(data: bytes, batch: int, length: int, count: int) -> list[np.ndarray]:
    """A fixed list of ``count`` batches spread evenly over ``data``."""
    tokens = np.frombuffer(data, np.uint8).astype(np.int32)
    starts = np.linspace(0, len(tokens) - length - 1, count * batch).astype(int)
    return [np.stack([tokens[s : s + length] for s in starts[i * batch : (i + 1) * batch]]) for i in range(count)]
