"""`to_peft(..., portable=True)` and `check_portable`: an adapter every reader of PEFT's format
computes the same way. Reference: PEFT's own merge of the regular export (rank_pattern,
alpha_pattern, rsLoRA), against which the portable export's ΔW is checked twice: merged by PEFT,
and applied with NumPy as llama.cpp's converter and vLLM read it (one `lora_alpha / r`)."""

import json
import os

import jax
import numpy as np
import pytest
from conftest import randomize
from tiny_gemma import MIXED, TINY, gemma3, scalar

import lora_jax as lj

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("gguf")



def _merged(root, base, directory) -> dict[str, np.ndarray]:
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        root, gguf_file=os.path.basename(base), dtype=torch.float32,
        query_pre_attn_scalar=scalar(base),
    )  # fmt: skip
    model = peft.PeftModel.from_pretrained(hf, directory).merge_and_unload()
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


@pytest.mark.interop
def test_portable_export_has_one_rank_one_alpha_and_the_same_delta(tmp_path):
    base = gemma3.write_tiny_gguf(tmp_path / "base.gguf", TINY, seed=0)
    _, model, _ = gemma3.load(base)
    lora = randomize(lj.init(jax.random.key(1), model, MIXED), jax.random.key(2), std=0.05)
    lj.to_peft(tmp_path / "regular", lora)
    lj.to_peft(tmp_path / "portable", lora, portable=True)
    problems = lj.check_portable(tmp_path / "regular")
    assert [p.split(" ")[0] for p in problems] == ["rank_pattern", "alpha_pattern", "use_rslora"]
    assert lj.check_portable(tmp_path / "portable") == []
    config = json.loads((tmp_path / "portable" / "adapter_config.json").read_text())
    assert config["r"] == 4 and not config["rank_pattern"] and not config["alpha_pattern"] and not config["use_rslora"]

    want = _merged(tmp_path, base, tmp_path / "regular")
    got = _merged(tmp_path, base, tmp_path / "portable")
    plain = {k: v.numpy() for k, v in transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="base.gguf", dtype=torch.float32).state_dict().items()}  # fmt: skip
    adapted = [k for k in want if any(f"{m}.weight" in k for m in ("q_proj", "v_proj", "down_proj"))]
    assert adapted and max(np.abs(want[k] - plain[k]).max() for k in adapted) > 1e-2
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)

    # one lora_alpha / r for every module, as llama.cpp's converter and vLLM read the config
    from safetensors.numpy import load_file

    tensors = load_file(tmp_path / "portable" / "adapter_model.safetensors")
    scale = config["lora_alpha"] / config["r"]
    for key in [k for k in tensors if k.endswith("lora_A.weight")]:
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        delta = scale * tensors[key.replace("lora_A", "lora_B")].astype(np.float64) @ tensors[key]
        np.testing.assert_allclose(plain[f"{module}.weight"] + delta, want[f"{module}.weight"], rtol=1e-5,
                                   atol=1e-6, err_msg=module)  # fmt: skip


def test_portable_refuses_what_vllm_refuses(tmp_path):
    params = {"q": {"kernel": np.ones((8, 4), np.float32)}}
    dora = lj.init(jax.random.key(0), params, lj.LoraConfig(rank=2, use_dora=True))
    with pytest.raises(ValueError, match=r"'q/kernel': a DoraAdapter \(dora\) has no plain LoRA form; merge it"):
        lj.to_peft(tmp_path / "d", dora, portable=True)
    full = {"q": {"kernel": lj.FullWeight(np.ones((8, 4), np.float32))}}
    with pytest.raises(ValueError, match="modules_to_save"):
        lj.to_peft(tmp_path / "f", full, portable=True)
    assert not (tmp_path / "d").exists() and not (tmp_path / "f").exists()
    with pytest.raises(ValueError, match="cannot read"):
        lj.check_portable(tmp_path / "absent")
