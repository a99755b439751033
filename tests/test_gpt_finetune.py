"""Smoke test of the tiny-GPT example: `examples/gpt_finetune.py --quick` end to end, and its errors."""

import json
import os
import shutil
import subprocess
import sys

import jax
import pytest
from conftest import leaf_pairs

import lora_jax as lj

pytestmark = pytest.mark.slow  # examples and real models: minutes in all

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "gpt_finetune.py")


def _run(*args, check=True):
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", *args], capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"gpt_finetune.py failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    proc = _run("--out", str(root / "out"), "--base-dir", str(root / "base"))
    return root, proc


def test_outputs_exist_and_load(quick_run):
    root, proc = quick_run
    out = root / "out"
    assert sorted(os.listdir(out)) == ["adapter.safetensors", "loss.png", "merged.safetensors", "metrics.json", "peft"]
    assert sorted(os.listdir(out / "peft")) == ["adapter_config.json", "adapter_model.safetensors"]
    metrics = json.loads((out / "metrics.json").read_text())
    losses = metrics["held_out_loss"]
    assert losses["lora"]["code"] < losses["base"]["code"]  # LoRA learned the new domain
    assert "held-out loss in nats/byte" in proc.stdout and "--- sample, LoRA ---" in proc.stdout

    sys.path.insert(0, os.path.join(ROOT, "examples"))
    from gpt import GPT
    from gpt_finetune import QUICK

    model = GPT(QUICK.model)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jax.numpy.zeros((1, 8), "int32"))["params"])
    merged = lj.load_params(out / "merged.safetensors")
    assert jax.tree.map(lambda x: x.shape, merged) == jax.tree.map(lambda s: s.shape, shapes)
    adapters = lj.load(out / "adapter.safetensors")
    assert lj.summary(merged, adapters).trainable_params == metrics["trainable_params"]
    from_peft = lj.from_peft(out / "peft", merged)
    for u, v in leaf_pairs(from_peft, adapters):
        assert (u == v).all()
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_second_run_uses_the_cached_base_and_bfloat16_runs(quick_run, tmp_path):
    root, _ = quick_run
    proc = _run("--out", str(tmp_path), "--base-dir", str(root / "base"), "--steps", "2", "--dtype", "bfloat16")
    assert "pretrained base loaded from the cache" in proc.stdout
    merged = lj.load_params(tmp_path / "merged.safetensors")
    assert {x.dtype for x in jax.tree.leaves(merged)} == {jax.numpy.dtype("bfloat16")}  # the frozen base in bf16
    assert {x.dtype for x in jax.tree.leaves(lj.load(tmp_path / "adapter.safetensors"))} == {jax.numpy.dtype("float32")}


def test_corrupt_cached_base_is_rebuilt(quick_run, tmp_path):
    root, _ = quick_run
    shutil.copytree(root / "base", tmp_path / "base")
    (cached,) = (tmp_path / "base").iterdir()
    cached.write_bytes(cached.read_bytes()[:100])
    proc = _run("--out", str(tmp_path / "out"), "--base-dir", str(tmp_path / "base"), "--steps", "2")
    assert "is unusable" in proc.stdout and "pretraining it again" in proc.stdout
    lj.load_params(cached)  # rewritten whole


def test_targets_matching_nothing(quick_run, tmp_path):
    root, _ = quick_run
    proc = _run("--out", str(tmp_path), "--base-dir", str(root / "base"), "--targets", "nothing/here", check=False)
    assert proc.returncode == 2
    assert "error: --targets 'nothing/here': lora_jax.init: targets matched no parameter" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unwritable_output_directory(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    proc = _run("--out", str(tmp_path / "file" / "run"), check=False)
    assert proc.returncode == 2
    assert "error: cannot write to the run directory" in proc.stderr and "Traceback" not in proc.stderr


def test_the_variants_run(quick_run, tmp_path):
    """DoRA, PiSSA and LoRA+ together on the cached base; the PEFT export of the PiSSA adapter is
    the converted one, of the original base (rank doubled)."""
    root, _ = quick_run
    proc = _run("--out", str(tmp_path), "--base-dir", str(root / "base"), "--steps", "3", "--dora", "--init",
                "pissa", "--loraplus-ratio", "4")  # fmt: skip
    assert "DoRA (pissa) (LoRA+ 4) r=8" in proc.stdout
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["r"] == 16
