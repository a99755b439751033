"""Where a compiled JAX program's time goes: XLA:CPU's own trace of each kernel it ran.

``op_times(fn, args)`` runs a jitted ``fn`` under ``jax.profiler.trace`` (a Perfetto trace,
no extra packages) and returns the milliseconds per run of each fusion or op XLA executed;
``grouped`` sums them by kind (the op name without its ``.N`` suffix). Used by
``many_adapters.py --profile`` and ``gemma_step.py``.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile

import jax

_RUNTIME = re.compile(r"^\$|Thunk|Pjit|Slinky|PjRt|^end: |Parse|Handle|Allocate|PythonRef|ExecuteHelper")


def op_times(fn, args: tuple, reps: int = 5) -> dict[str, float]:
    """``{op name: milliseconds per run}`` of the compiled ``fn(*args)``, averaged over ``reps``
    runs after a warm-up; runtime bookkeeping events (thread pools, argument handling) left out."""
    jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as root:
        with jax.profiler.trace(root, create_perfetto_trace=True):
            for _ in range(reps):
                jax.block_until_ready(fn(*args))
        (path,) = glob.glob(os.path.join(root, "**", "*.trace.json.gz"), recursive=True)
        with gzip.open(path) as f:
            events = json.load(f)["traceEvents"]
    total: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and not _RUNTIME.search(e["name"]):
            total[e["name"]] += e.get("dur", 0) / 1e3 / reps
    return dict(total)


def grouped(times: dict[str, float]) -> dict[str, tuple[float, int]]:
    """``{kind: (milliseconds, count)}``: ``op_times`` summed over ops of one kind
    (``ynn_fusion.12`` and ``ynn_fusion`` are both ``ynn_fusion``), largest first."""
    kinds: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    for name, ms in times.items():
        kind = kinds[re.sub(r"\.\d+$", "", name)]
        kind[0] += ms
        kind[1] += 1
    return dict(sorted(((k, (ms, n)) for k, (ms, n) in kinds.items()), key=lambda kv: -kv[1][0]))


def print_grouped(title: str, groups: dict[str, tuple[float, int]], top: int = 8) -> None:
    total = sum(ms for ms, _ in groups.values())
    print(f"  {title}: {total:.1f} ms in XLA's kernels")
    for kind, (ms, n) in list(groups.items())[:top]:
        print(f"    {ms:8.2f} ms  {ms / total:6.1%}  {n:4d} x {kind}")
