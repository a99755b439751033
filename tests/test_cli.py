"""The `lora-jax` command (run as a subprocess): inspect, convert and merge across lora_jax files,
PEFT directories and GGUF adapters, on a tiny random Gemma 3 GGUF; and its errors."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomize
from tiny_gemma import TINY, gemma3

import lora_jax as lj

gguf = pytest.importorskip("gguf")

SOME = r"model/layers/\d+/(self_attn/(q|v)_proj|mlp/down_proj)/kernel"


def cli(*args):
    return subprocess.run([sys.executable, "-m", "lora_jax._cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    base = gemma3.write_tiny_gguf(root / "base.gguf", TINY, seed=0)
    _, model, _ = gemma3.load(base)
    lora = randomize(lj.init(jax.random.key(1), model, lj.LoraConfig(rank=4, alpha=8.0, targets=SOME)),
                     jax.random.key(2), std=0.05)  # fmt: skip
    lj.save(root / "adapter.safetensors", lora)
    lj.to_peft(root / "peft", lora)
    return root, base, lora


def _same_adapters(got, want):
    assert set(_flat(got)) == set(_flat(want))
    for path, ad in _flat(want).items():
        other = _flat(got)[path]
        assert other.scale == pytest.approx(ad.scale)
        np.testing.assert_allclose(np.asarray(other.a) @ np.asarray(other.b), np.asarray(ad.a) @ np.asarray(ad.b),
                                   rtol=1e-6, atol=1e-7)  # fmt: skip


def _flat(tree):
    from lora_jax._core import tree as _tree

    return _tree.adapters_by_path(tree, "test")


@pytest.mark.slow
def test_help_shows_examples():
    proc = cli("--help")
    assert proc.returncode == 0 and "examples:" in proc.stdout and "lora-jax merge --base" in proc.stdout
    proc = cli("convert", "--help")
    assert proc.returncode == 0 and "--to {lora_jax,peft,gguf}" in proc.stdout


@pytest.mark.slow
def test_inspect_every_format(files):
    root, base, lora = files
    lj.to_gguf_lora(root / "adapter.gguf", lora, base)
    for path, fmt, first in ((root / "adapter.safetensors", "lora_jax", "model/layers/0/mlp/down_proj/kernel"),
                             (root / "peft", "peft", "model/layers/0/mlp/down_proj/kernel"),
                             (root / "adapter.gguf", "gguf", "blk.0.attn_q.weight")):  # fmt: skip
        proc = cli("inspect", path, "--json")
        assert proc.returncode == 0, proc.stderr
        info = json.loads(proc.stdout)
        assert info["format"] == fmt and info["targets"] == 3 * TINY.layers
        assert info["parameters"] == sum(x.size for x in jax.tree.leaves(lora)) and info["bytes"] > 0
        rows = {r["target"]: r for r in info["adapters"]}
        assert rows[first]["rank"] == 4 and rows[first]["alpha"] == 8.0 and rows[first]["scale"] == 2.0
        table = cli("inspect", path)
        assert table.returncode == 0 and first in table.stdout and f"format {fmt}" in table.stdout


@pytest.mark.slow
def test_convert_round_trips(files, tmp_path):
    root, base, lora = files
    assert cli("convert", root / "peft", tmp_path / "a.gguf", "--to", "gguf", "--base", base).returncode == 0
    lj.to_gguf_lora(tmp_path / "direct.gguf", lora, base)  # the same file as the library writes
    reader = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(tmp_path / "direct.gguf").tensors}
    for t in gguf.GGUFReader(tmp_path / "a.gguf").tensors:
        np.testing.assert_array_equal(np.asarray(t.data), reader[t.name])
    proc = cli("convert", tmp_path / "a.gguf", tmp_path / "back", "--to", "peft", "--base", base)
    assert proc.returncode == 0, proc.stderr
    _, model, _ = gemma3.load(base)
    from flax import nnx

    _same_adapters(lj.from_peft(tmp_path / "back", nnx.state(model)), lora)
    assert cli("convert", tmp_path / "back", tmp_path / "c.safetensors", "--to", "lora_jax").returncode == 0
    _same_adapters(lj.load(tmp_path / "c.safetensors"), lora)


@pytest.mark.slow
def test_portable_conversion_and_its_report(files, tmp_path):
    root, base, _ = files
    _, model, _ = gemma3.load(base)
    config = lj.LoraConfig(rank=4, targets=SOME, rank_pattern={r".*down_proj.*": 2})
    lj.to_peft(tmp_path / "patterned", lj.init(jax.random.key(0), model, config))
    proc = cli("inspect", tmp_path / "patterned")
    assert proc.returncode == 0 and "not portable" in proc.stdout and "rank_pattern" in proc.stdout
    proc = cli("convert", tmp_path / "patterned", tmp_path / "flat", "--to", "peft", "--portable")
    assert proc.returncode == 0, proc.stderr
    assert lj.check_portable(tmp_path / "flat") == []
    info = json.loads(cli("inspect", tmp_path / "flat", "--json").stdout)
    assert info["portable"] == "yes" and {r["rank"] for r in info["adapters"]} == {4}


@pytest.mark.slow
def test_merge_into_gguf_and_safetensors(files, tmp_path):
    root, base, lora = files
    proc = cli("merge", "--base", base, "--adapter", root / "adapter.safetensors", "--out", tmp_path / "m.gguf")
    assert proc.returncode == 0, proc.stderr
    lj.to_gguf(tmp_path / "direct.gguf", base, lora)
    want = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(tmp_path / "direct.gguf").tensors}
    for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors:
        np.testing.assert_array_equal(np.asarray(t.data), want[t.name])
    # a PyTorch state dict (what lj.save_params(torch_names=True) and transformers write)
    _, model, _ = gemma3.load(base)
    from flax import nnx

    state = nnx.state(model)
    lj.save_params(tmp_path / "base.safetensors", state, torch_names=True)
    proc = cli("merge", "--base", tmp_path / "base.safetensors", "--adapter", root / "peft", "--out",
               tmp_path / "m.safetensors")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lj.save_params(tmp_path / "want.safetensors", state, lora, torch_names=True)
    from safetensors.numpy import load_file

    got, want = load_file(tmp_path / "m.safetensors"), load_file(tmp_path / "want.safetensors")
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6, err_msg=k)


@pytest.mark.slow
def test_bad_input_exits_2_with_a_message(files, tmp_path):
    root, base, lora = files
    proc = cli("inspect", tmp_path / "absent")
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "notes.txt").write_text("hello")
    proc = cli("inspect", tmp_path / "notes.txt")
    assert proc.returncode == 2 and "notes.txt" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli("convert", root / "peft", tmp_path / "x.gguf", "--to", "gguf")
    assert proc.returncode == 2 and "needs --base" in proc.stderr
    proc = cli("convert", root / "adapter.safetensors", tmp_path / "x.gguf", "--to", "pdf")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
    # DoRA has no llama.cpp adapter form
    _, model, _ = gemma3.load(base)
    dora = lj.init(jax.random.key(3), model, lj.LoraConfig(rank=4, targets=SOME, use_dora=True))
    lj.to_peft(tmp_path / "dora", dora)
    proc = cli("convert", tmp_path / "dora", tmp_path / "x.gguf", "--to", "gguf", "--base", base)
    assert proc.returncode == 2 and "DoraAdapter" in proc.stderr and "no llama.cpp LoRA form" in proc.stderr
    # an adapter for another base
    wide = gemma3.write_tiny_gguf(tmp_path / "wide.gguf", gemma3.Gemma3Config(**{**TINY.__dict__, "width": 96}))
    proc = cli("merge", "--base", wide, "--adapter", root / "peft", "--out", tmp_path / "x.gguf")
    assert proc.returncode == 2 and "q_proj/kernel" in proc.stderr and "the base's is" in proc.stderr
    assert not (tmp_path / "x.gguf").exists()
    ad = {"model": {"layers": {"0": {"self_attn": {"q_proj": {"kernel": lj.Adapter(jnp.ones((5, 2)), jnp.ones((2, 3)),
                                                                                     rank=2, alpha=2.0)}}}}}}  # fmt: skip
    lj.save(tmp_path / "odd.safetensors", ad)
    lj.save_params(tmp_path / "b.safetensors", {"model": {"layers": {"0": {"self_attn": {"q_proj": {
        "kernel": jnp.ones((64, 64))}}}}}}, torch_names=True)  # fmt: skip
    proc = cli("merge", "--base", tmp_path / "b.safetensors", "--adapter", tmp_path / "odd.safetensors", "--out",
               tmp_path / "y.safetensors")  # fmt: skip
    assert proc.returncode == 2 and "the adapter is for a (3, 5) tensor, the base's is (64, 64)" in proc.stderr
    assert not (tmp_path / "y.safetensors").exists()
