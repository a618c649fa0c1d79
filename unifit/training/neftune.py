"""NEFTune (Jain et al. 2023): uniform noise on the input embeddings during fine-tuning.

Noise is `eps ~ U(-1, 1)` scaled by `alpha / sqrt(L_i * d)`, where `L_i` is the number of *real* tokens
of sequence i (or of each packed segment) — not the padded length — and pad positions get no noise.
Hugging Face's built-in hook scales by the padded length and noises pads; this one does not.
"""

from __future__ import annotations

from typing import Any, Optional

import torch


def add_noise(embeddings: torch.Tensor, attention_mask: torch.Tensor, alpha: float, *,
              segment_ids: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Noised copy of `embeddings` (B, T, d); `attention_mask` (B, T) is 1 on real tokens, 0 on pads.

    With `segment_ids` (B, T), each packed segment is scaled by its own real-token count, so a short
    conversation packed beside a long one gets the same noise it would get alone.
    """
    if alpha == 0:
        return embeddings
    batch, length, dim = embeddings.shape
    if attention_mask.shape != (batch, length):
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} does not match embeddings {tuple(embeddings.shape)}")
    real = attention_mask.to(device=embeddings.device, dtype=torch.float32)
    if segment_ids is None:
        lengths = real.sum(dim=1, keepdim=True).expand(batch, length)  # L_i broadcast over the row
    else:
        if segment_ids.shape != (batch, length):
            raise ValueError(f"segment_ids shape {tuple(segment_ids.shape)} does not match embeddings {tuple(embeddings.shape)}")
        seg = segment_ids.to(device=embeddings.device, dtype=torch.long)
        seg = seg - seg.min(dim=1, keepdim=True).values  # segment ids need only be distinct within a row
        counts = torch.zeros(batch, int(seg.max()) + 1, device=embeddings.device).scatter_add_(1, seg, real)
        lengths = counts.gather(1, seg)  # each token's segment length
    scale = alpha / torch.sqrt(lengths.clamp(min=1.0) * dim) * real  # 0 on pads
    eps = torch.rand(embeddings.shape, generator=generator, device=embeddings.device, dtype=torch.float32) * 2 - 1
    return embeddings + (eps * scale.unsqueeze(-1)).to(embeddings.dtype)


class NEFTuneHook:
    """Forward hook on the input-embedding module that noises its output in training mode only.

    Hooks the module's *output*, so it works when the weight is partitioned (ZeRO-3) or the model is
    wrapped (PEFT, DeepSpeed engine). Set `attention_mask` (and `segment_ids` for packed batches) before
    every forward: the embedding module only sees token ids and cannot tell pads from real tokens.
    """

    def __init__(self, alpha: float, generator: Optional[torch.Generator] = None) -> None:
        self.alpha = alpha
        self.generator = generator
        self.attention_mask: Optional[torch.Tensor] = None
        self.segment_ids: Optional[torch.Tensor] = None

    def attach(self, model: Any) -> torch.utils.hooks.RemovableHandle:
        """Register on `model.get_input_embeddings()`; the returned handle's `.remove()` detaches it."""
        return model.get_input_embeddings().register_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        if not module.training or self.alpha == 0:
            return output
        if self.attention_mask is None or self.attention_mask.shape != output.shape[:2]:
            got = None if self.attention_mask is None else tuple(self.attention_mask.shape)
            raise RuntimeError(f"NEFTuneHook: set hook.attention_mask for this batch before forward "
                               f"(expected shape {tuple(output.shape[:2])}, got {got})")
        return add_noise(output, self.attention_mask, self.alpha, segment_ids=self.segment_ids, generator=self.generator)

