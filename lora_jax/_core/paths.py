"""Parameter paths: keys of a pytree joined by ``/`` and regex target matching.

A Linen ``params`` dict gives ``decoder/layers_0/attn/query/kernel``; an NNX ``State``
gives ``layers/0/attn/query/kernel`` (the ``.value`` attribute of an ``nnx.Variable`` is
not part of the path).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

Key = str | int
Keys = tuple[Key, ...]
Pattern = str | Sequence[str] | Callable[[str, Any], bool]


def _key_value(entry: Any) -> Key:
    if isinstance(entry, jax.tree_util.DictKey):
        return entry.key
    if isinstance(entry, jax.tree_util.SequenceKey):
        return entry.idx
    if isinstance(entry, jax.tree_util.GetAttrKey):
        return entry.name
    if isinstance(entry, jax.tree_util.FlattenedIndexKey):
        return entry.key
    raise TypeError(f"lora_jax: unsupported pytree key {entry!r}.")


def keys_of(keypath: Sequence[Any]) -> Keys:
    """The plain keys of a JAX key path, without an NNX Variable's trailing ``value``."""
    if keypath and isinstance(keypath[-1], jax.tree_util.GetAttrKey) and keypath[-1].name == "value":
        keypath = keypath[:-1]
    return tuple(_key_value(entry) for entry in keypath)


def join(keys: Iterable[Key]) -> str:
    """``('a', 0, 'kernel')`` -> ``'a/0/kernel'``."""
    return "/".join(str(k) for k in keys)


def path_leaf(x: Any) -> bool:
    """Pytrees that stand for one parameter (a quantized kernel: ``is_path_leaf = True``)."""
    return getattr(type(x), "is_path_leaf", False) is True


def leaves_with_paths(tree: Any, is_leaf: Callable[[Any], bool] | None = None) -> list[tuple[Keys, Any]]:
    """``[(keys, leaf), ...]`` of a pytree, in flattening order; a quantized kernel is one leaf."""
    given = is_leaf
    is_leaf = path_leaf if given is None else (lambda x: path_leaf(x) or given(x))
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [(keys_of(kp), leaf) for kp, leaf in flat]


def by_path(tree: Any, where: str, is_leaf: Callable[[Any], bool] | None = None) -> dict[str, tuple[Keys, Any]]:
    """``{path: (keys, leaf)}`` of a pytree; a ``ValueError`` if two leaves join to one path
    (``{'a/b': x}`` and ``{'a': {'b': y}}``), which every lookup by path would mix up."""
    out: dict[str, tuple[Keys, Any]] = {}
    clashes = []
    for keys, leaf in leaves_with_paths(tree, is_leaf):
        path = join(keys)
        if path in out:
            clashes.append(f"{out[path][0]!r} and {keys!r} both give {path!r}")
        out[path] = (keys, leaf)
    if clashes:
        raise ValueError(
            f"{where}: keys containing '/' make two leaves share a path:"
            + "".join(f"\n  {c}" for c in clashes)
            + "\nRename the keys so that no key contains '/'."
        )
    return out


def nest(items: Iterable[tuple[Keys, Any]], where: str = "lora_jax") -> dict:
    """Build nested dicts from ``(keys, value)`` pairs: the inverse of flattening by path.

    Raises:
      ValueError: if one path is a prefix of another (``d`` and ``d/kernel``) or repeats, so
        that a value would be silently dropped.
    """
    root: dict = {}
    for keys, value in items:
        node = root
        for i, k in enumerate(keys[:-1]):
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ValueError(f"{where}: {join(keys)!r} nests inside the entry {join(keys[: i + 1])!r}.")
        if keys[-1] in node:
            raise ValueError(f"{where}: {join(keys)!r} would replace another entry at the same place.")
        node[keys[-1]] = value
    return root


def compile_pattern(pattern: Pattern | None, what: str, where: str) -> Callable[[str, Any], bool] | None:
    """A predicate ``(path, leaf) -> bool`` from a regex, a list of regexes or a callable.

    Regexes are matched with ``re.fullmatch`` against the whole path; errors name ``where``,
    the function the user called, and ``what``, its argument.
    """
    if pattern is None:
        return None
    if callable(pattern):
        return _checked(pattern, what, where)
    try:
        patterns: list[Any] = [pattern] if isinstance(pattern, str) else list(pattern)
    except TypeError:
        patterns = [pattern]  # reported below
    compiled = []
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(
                f"{where}: {what} must be a regex string, a list of regex strings "
                f"or a callable(path, leaf) -> bool; found an element {p!r} of type "
                f"{type(p).__name__}."
            )
        try:
            compiled.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"{where}: {what} pattern {p!r} is not a valid regex: {e}.") from None
    return lambda path, leaf: any(c.fullmatch(path) for c in compiled)


def _checked(predicate: Callable[[str, Any], Any], what: str, where: str) -> Callable[[str, Any], bool]:
    """A user's ``(path, leaf) -> bool`` whose exceptions and non-bool answers name the path."""

    def check(path: str, leaf: Any) -> bool:
        try:
            answer = predicate(path, leaf)
        except Exception as e:
            raise ValueError(f"{where}: the {what} callable raised on {path!r}: {e!r}") from e
        if not isinstance(answer, (bool, np.bool_)):
            raise TypeError(
                f"{where}: the {what} callable must return a bool, returned {type(answer).__name__} on {path!r}."
            )
        return bool(answer)

    return check


def first_match(patterns: Mapping[str, Any], path: str, where: str = "lora_jax") -> str | None:
    """The first key of ``patterns`` (regexes, in order) that fully matches ``path``."""
    for p in patterns:
        try:
            if re.fullmatch(p, path):
                return p
        except (re.error, TypeError) as e:
            raise ValueError(f"{where}: the key {p!r} is not a valid regex ({e}).") from None
    return None
