"""``lora-jax``: inspect, convert and merge adapters from the command line.

Formats, told apart by what the path holds: a lora_jax adapter file (``lj.save``), a PEFT
adapter directory (``adapter_config.json``), a llama.cpp LoRA adapter (GGUF). Exit status 0 on
success, 2 on bad input (the message names the file and what is wrong), 1 on anything else.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save

import lora_jax as lj
from lora_jax._core import kind as _kind
from lora_jax._core import paths as _paths
from lora_jax._core import tree as _tree
from lora_jax._files import gguf as _gguf
from lora_jax._files import peft as _peft
from lora_jax._files import safetensors as _safetensors
from lora_jax._files import torch_names as _torch_names

EXAMPLES = """examples:
  lora-jax inspect runs/finetune/adapter.safetensors
  lora-jax inspect runs/finetune/peft
  lora-jax convert runs/finetune/peft adapter.gguf --to gguf --base gemma-3-270m-q4_k_m.gguf
  lora-jax convert adapter.gguf peft_dir --to peft --base gemma-3-270m-q4_k_m.gguf
  lora-jax convert runs/finetune/adapter.safetensors for_vllm --to peft --portable
  lora-jax merge --base gemma-3-270m-q4_k_m.gguf --adapter runs/finetune/peft --out tuned.gguf --dtype q8_0
  lora-jax merge --base model.safetensors --adapter adapter.safetensors --out merged.safetensors
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lora-jax", description="Inspect, convert and merge LoRA adapters (lora_jax, PEFT, GGUF).",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("inspect", help="targets, ranks, alphas, parameters and bytes of an adapter",
                            epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("path", help="a lora_jax adapter file, a PEFT directory or a GGUF LoRA adapter")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p = commands.add_parser("convert", help="write an adapter in another format",
                            epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--to", required=True, choices=["lora_jax", "peft", "gguf"])
    p.add_argument("--base", help="the base model's GGUF (needed to write or read GGUF adapters)")
    p.add_argument("--dtype", default="f32", choices=_gguf.DTYPES, help="GGUF tensor type")
    p.add_argument("--portable", action="store_true",
                   help="with --to peft: one rank and alpha, scales folded (what vLLM and llama.cpp read alike)")
    p = commands.add_parser("merge", help="the base model with the adapter merged into it",
                            epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--base", required=True, help="the base model: a GGUF file or a safetensors state dict")
    p.add_argument("--adapter", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="f32", choices=_gguf.DTYPES, help="merged GGUF tensors")
    args = parser.parse_args(argv)
    try:
        {"inspect": _inspect, "convert": _convert, "merge": _merge}[args.command](args)
    except BrokenPipeError:  # the output was piped into a command that stopped reading (head)
        return 0
    except (ValueError, TypeError, OSError, ImportError) as e:
        print(f"lora-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


# ---- reading any adapter ---------------------------------------------------------------------


def read(path: str, base: str | None = None) -> tuple[str, dict]:
    """``(format, adapter tree)`` of a lora_jax file, a PEFT directory or a GGUF LoRA adapter."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path!r} does not exist")
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise ValueError(f"{path!r} is a directory without adapter_config.json, not a PEFT adapter")
        return "peft", lj.from_peft(path, _peft_shapes(path))
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return "gguf", _gguf_tree(path, base)
    return "lora_jax", lj.load(path)


def _peft_shapes(directory: str) -> dict:
    """A parameter tree of shapes only (``jax.ShapeDtypeStruct``) for the modules a PEFT file adapts."""


    items = []
    with safe_open(os.path.join(directory, _peft.WEIGHTS), "np") as f:
        shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}
    for key, shape in shapes.items():
        m = _peft.LORA_KEY.fullmatch(key)
        if m is None or m["part"] not in ("lora_A.weight", "lora_embedding_A"):
            continue
        partner = shapes.get(key.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B"))
        if partner is None or len(shape) != 2:
            continue  # from_peft names what is missing or not a Linear/Embedding
        embedding = m["part"] == "lora_embedding_A"
        keys = m["module"].split(".") + ["embedding" if embedding else "kernel"]
        items.append((tuple(keys), jax.ShapeDtypeStruct((shape[1], partner[0]), np.float32)))
    return _paths.nest(items, "lora-jax")


def _gguf_tree(path: str, base: str | None) -> dict:
    """A GGUF LoRA adapter as lora_jax adapters, at the PyTorch module names of the base's architecture."""


    lora = _gguf.read_lora(path, "lora-jax")
    if base is None:
        raise ValueError("reading a GGUF adapter needs --base BASE.gguf (its architecture names the modules)")
    info = _gguf.Base(base, "lora-jax")
    if lora["architecture"] != info.arch:
        raise ValueError(f"the adapter is for {lora['architecture']!r}, the base {base!r} is {info.arch!r}")
    modules = info.modules()
    items = []
    for name, (lora_a, lora_b) in lora["tensors"].items():
        if name not in modules:
            raise ValueError(f"{path!r}: {name!r} is not a tensor of the base {base!r}")
        rank = lora_b.shape[1]
        alpha = lora["alpha"] or float(rank)  # llama.cpp: alpha 0 means a scale of 1
        embedding = name == "token_embd.weight"
        a, b = (lora_a, lora_b.T) if embedding else (lora_a.T, lora_b.T)
        adapter = lj.Adapter(jnp.asarray(a), jnp.asarray(b), rank=rank, alpha=alpha)
        items.append((tuple(modules[name].split(".")) + ("embedding" if embedding else "kernel",), adapter))
    return _paths.nest(items, "lora-jax")


# ---- the commands ----------------------------------------------------------------------------


def _inspect(args: argparse.Namespace) -> None:


    fmt, tree = read(args.path, None) if not _is_gguf(args.path) else ("gguf", None)
    rows = []
    if tree is None:  # a GGUF adapter: described as llama.cpp names it, no base needed
        lora = _gguf.read_lora(args.path, "lora-jax")
        for name, (lora_a, lora_b) in sorted(lora["tensors"].items()):
            rank, alpha = int(lora_b.shape[1]), lora["alpha"]
            rows.append({"target": name, "kind": "lora", "rank": rank, "alpha": alpha, "scale": alpha / rank if alpha
                         else 1.0, "parameters": int(lora_a.size + lora_b.size)})  # fmt: skip
        header = {"format": "gguf", "architecture": lora["architecture"]}
    else:
        for path, adapter in _tree.adapters_by_path(tree, "lora-jax").items():
            kind = _kind.kind_of(adapter)
            arrays = [x for x in jax.tree.leaves(adapter) if hasattr(x, "size")]
            row = {"target": path, "kind": kind.name, "parameters": int(sum(x.size for x in arrays))}
            if hasattr(adapter, "rank"):
                row.update(rank=int(adapter.rank), alpha=float(adapter.alpha), scale=float(adapter.scale))
            rows.append(row)
        header = {"format": fmt}
        if fmt == "peft":

            header["portable"] = lj.check_portable(args.path) or "yes"
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(args.path) for f in fs) if os.path.isdir(
        args.path) else os.path.getsize(args.path)  # fmt: skip
    header.update(targets=len(rows), parameters=sum(r["parameters"] for r in rows), bytes=size)
    if args.json:
        print(json.dumps({**header, "adapters": rows}, indent=1))
        return
    problems = header.pop("portable", "yes")
    print(", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in header.items()))
    if problems != "yes":  # a PEFT directory that some runtime reads differently
        print("not portable (vLLM, llama.cpp's converter): " + "; ".join(problems))
    print(f"{'target':60s} {'kind':6s} {'rank':>5s} {'alpha':>8s} {'scale':>8s} {'parameters':>11s}")
    for r in rows:
        cells = [f"{r[k]:g}" if k in r else "-" for k in ("rank", "alpha", "scale")]
        print(f"{r['target']:60s} {r['kind']:6s} {cells[0]:>5s} {cells[1]:>8s} {cells[2]:>8s} {r['parameters']:11,d}")


def _convert(args: argparse.Namespace) -> None:

    _, tree = read(args.src, args.base)
    if args.to == "lora_jax":
        lj.save(args.dst, tree)
    elif args.to == "peft":
        lj.to_peft(args.dst, tree, portable=args.portable)
    else:
        if args.base is None:
            raise ValueError("--to gguf needs --base BASE.gguf (the model the adapter is for)")
        lj.to_gguf_lora(args.dst, tree, args.base, dtype=args.dtype)
    print(f"wrote {args.dst}")


def _merge(args: argparse.Namespace) -> None:

    gguf_base = _is_gguf(args.base)
    _, tree = read(args.adapter, args.base if gguf_base else None)
    if gguf_base:
        lj.to_gguf(args.out, args.base, tree, dtype=args.dtype, progress=True)
    else:
        _merge_safetensors(args.base, tree, args.out)
    print(f"wrote {args.out}")


def _merge_safetensors(base: str, tree: dict, out: str) -> None:
    """A PyTorch state dict (safetensors) with each adapter merged into ``<module>.weight``."""


    if not os.path.isfile(base):
        raise FileNotFoundError(f"the base {base!r} does not exist")
    try:
        weights = load_file(base)
    except Exception as e:
        raise ValueError(f"{base!r} is neither a GGUF file nor a readable safetensors file ({e})") from None
    for path, adapter in _tree.adapters_by_path(tree, "lora-jax merge").items():
        module = _torch_names.default_name(path)
        if f"{module}.weight" not in weights:
            raise ValueError(f"{path!r}: the base has no tensor {module + '.weight'!r}")
        w = weights[f"{module}.weight"]
        try:
            weights[f"{module}.weight"] = _torch_names.merge_into(path, adapter, w, module).astype(w.dtype)
        except ValueError as e:
            raise ValueError(f"{path!r} ({module}.weight): {e}") from None
    _safetensors.atomic_write(out, lambda f: f.write(save(weights)), "lora-jax merge")


def _is_gguf(path: str) -> bool:
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


if __name__ == "__main__":
    sys.exit(main())
