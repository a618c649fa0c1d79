"""Model architectures the benchmarks build from a config with random weights (speed does not depend on the weights).

`llama7b` has LLaMA-2-7B's shapes; `tiny` is the same family at toy size, for checking a GPU script end to end on
a CPU. Both use LLaMA-2's 32,000-token vocabulary, so token-id data made for one fits the other.
"""

from __future__ import annotations

from typing import Any

ARCHS: dict[str, dict[str, int]] = {
    "llama7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
    "tiny": dict(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096),
}


def llama_config(arch: str) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**ARCHS[arch])


def build_llama(arch: str, device: str, dtype: Any, **kwargs: Any) -> Any:
    """Random-weight causal LM of `arch`, created directly on `device` in `dtype` (seeded: 0)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(llama_config(arch), dtype=dtype, **kwargs)
