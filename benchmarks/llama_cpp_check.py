"""The main example's GGUF outputs in a real llama.cpp: exact match on the held-out sets.

Runs after ``python examples/finetune.py`` (its run directory holds ``adapter.gguf`` and
``merged.gguf``), with llama.cpp's Python bindings (``pip install llama-cpp-python``: it builds
llama.cpp, about 5 minutes on 2 cores). For both held-out sets of ``records.py``, greedy
decoding in llama.cpp of every prompt with (1) the base GGUF (Gemma 3 270M, q4_k_m) and the
adapter file (``--lora``) and (2) the merged GGUF (adapted tensors q8_0); the exact-match rate
is printed beside lora_jax's own (``metrics.json``: float32 weights, one-pass greedy check).

    python benchmarks/llama_cpp_check.py runs/finetune
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))
import records  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="the run directory of examples/finetune.py")
    parser.add_argument("--base", help="the base GGUF (default: the one metrics.json names)")
    args = parser.parse_args()
    from llama_cpp import Llama

    metrics = json.load(open(os.path.join(args.run, "metrics.json")))
    base = args.base or metrics["settings"]["gguf"]
    settings = metrics["settings"]
    variants = {
        "base (q4_k_m) + adapter.gguf": dict(model_path=base, lora_path=os.path.join(args.run, "adapter.gguf")),
        "merged.gguf (q8_0)": dict(model_path=os.path.join(args.run, "merged.gguf")),
    }
    print(f"llama.cpp via llama-cpp-python; base {os.path.basename(base)}; run {args.run}")
    for split in ("held-out", "unseen"):
        pairs = records.examples(settings["held_out"], split, settings["seed"])
        ours = metrics["held_out"]["lora"][split]["exact_match"]
        print(f"\n{split} ({len(pairs)} examples): lora_jax's exact match {ours:.1%}")
        for name, kw in variants.items():
            llm = Llama(n_ctx=256, verbose=False, n_threads=os.cpu_count() or 1, **kw)
            start, right = time.perf_counter(), 0
            for prompt, target in pairs:
                text = llm(prompt, max_tokens=64, temperature=0.0, stop=["\n"])["choices"][0]["text"]
                right += text + "\n" == target
            seconds = time.perf_counter() - start
            print(f"  llama.cpp, {name:30s} exact match {right / len(pairs):6.1%}  ({seconds:.0f} s)")


if __name__ == "__main__":
    main()
