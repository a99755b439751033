"""lora_jax: LoRA for JAX and Flax as pure functions over parameter pytrees.

>>> import jax, jax.numpy as jnp, lora_jax as lj
>>> params = {"dense": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)}}
>>> adapters = lj.init(jax.random.key(0), params, lj.LoraConfig(rank=2, alpha=2))
>>> merged = lj.apply_lora(params, adapters)
>>> jax.tree.map(jnp.shape, merged) == jax.tree.map(jnp.shape, params)
True
"""

from lora_jax import extend
from lora_jax._engine.attach import attach, detach
from lora_jax._engine.wrap import axis_roles, wrap
from lora_jax._files.adapters import load, save
from lora_jax._files.banks import bank, bank_to_peft
from lora_jax._files.from_peft import from_peft
from lora_jax._files.gguf import to_gguf, to_gguf_lora
from lora_jax._files.params import load_params, save_params
from lora_jax._files.peft import to_peft
from lora_jax._files.portable import check_portable
from lora_jax._kinds.bank import BASE, Bank, bank_index
from lora_jax._kinds.dora import DoraAdapter
from lora_jax._kinds.full import FullWeight
from lora_jax._kinds.lora import Adapter
from lora_jax._ops.combine import combine
from lora_jax._ops.config import LoraConfig
from lora_jax._ops.init import init
from lora_jax._ops.merge import apply_lora, merge_quantized, unmerge
from lora_jax._ops.optimizer import loraplus, optimizer
from lora_jax._ops.quantize import Quantized, dequantize, quantize, quantized_shardings
from lora_jax._ops.residual import convert_to_lora, init_residual
from lora_jax._ops.sharding import adapter_shardings
from lora_jax._ops.slots import bank_add, bank_get, bank_remove, bank_set
from lora_jax._ops.summary import Summary, TargetSummary, summary

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "adapter_shardings",
    "apply_lora",
    "attach",
    "axis_roles",
    "Bank",
    "bank",
    "bank_add",
    "bank_get",
    "bank_index",
    "bank_remove",
    "bank_set",
    "bank_to_peft",
    "BASE",
    "check_portable",
    "combine",
    "convert_to_lora",
    "dequantize",
    "detach",
    "DoraAdapter",
    "extend",
    "from_peft",
    "FullWeight",
    "init",
    "init_residual",
    "load",
    "load_params",
    "LoraConfig",
    "loraplus",
    "merge_quantized",
    "optimizer",
    "quantize",
    "Quantized",
    "quantized_shardings",
    "save",
    "save_params",
    "Summary",
    "summary",
    "TargetSummary",
    "to_gguf",
    "to_gguf_lora",
    "to_peft",
    "unmerge",
    "wrap",
]
