"""Attention for packed rows without flash-attn: each packed conversation attends only to itself.

On GPU, flash-attn's varlen kernel reads segment boundaries from the position ids. Elsewhere (CPU, or GPUs
without flash-attn) the alternative is a dense (T × T) block-diagonal mask, which costs attention over the whole
packed row and rules out the fused causal kernels. Here a packed row is instead split into its segments and each
one runs through SDPA with `is_causal=True`: exact per-conversation attention, no mask tensor, and work that
grows with the segments' lengths, not the row's. The spans come with the batch (`collate(..., mask_mode="segments")`)
and reach every attention layer as the `segment_spans` keyword argument of the model's forward.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

SEGMENT_ATTENTION = "unifit_segments"


def register_segment_attention() -> str:
    """Register the attention function (and a mask function that builds no mask) with transformers; its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(SEGMENT_ATTENTION, segment_attention)
    AttentionMaskInterface.register(SEGMENT_ATTENTION, _no_mask)
    return SEGMENT_ATTENTION


def _no_mask(*args: Any, **kwargs: Any) -> None:
    """The segments arrive with the batch; the model needs no mask tensor."""
    return None


def segment_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
                      scaling: Optional[float] = None, segment_spans: Optional[Sequence[Sequence[tuple[int, int]]]] = None,
                      **kwargs: Any) -> tuple[Any, None]:
    """transformers' attention-function signature: query (B, H, T, D), key/value (B, H_kv, T, D) -> (B, T, H, D).

    `segment_spans[b]` lists row b's [start, end) segments, covering the row.
    """
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if segment_spans is None:
        raise ValueError(f"attention '{SEGMENT_ATTENTION}' needs segment_spans (collate(..., mask_mode='segments')); "
                         "without them packed conversations would attend to each other")
    rows = []
    for row, spans in enumerate(segment_spans):
        pieces = [sdpa_attention_forward(module, query[row:row + 1, :, start:end], key[row:row + 1, :, start:end],
                                         value[row:row + 1, :, start:end], None, dropout=dropout, scaling=scaling,
                                         is_causal=True)[0]
                  for start, end in spans]
        rows.append(torch.cat(pieces, dim=1))
    return torch.cat(rows, dim=0), None


def attention_for(packing: bool, flash: bool) -> tuple[str, str]:
    """The model's `attn_implementation` and `collate`'s `mask_mode` (used by packed rows only) for a training run.

    flash-attn (GPU) reads packed segments from the position ids; without it, packed rows go segment by
    segment through SDPA; unpacked rows use SDPA with the padding mask.
    """
    if flash:
        return "flash_attention_2", "position_ids"
    return (register_segment_attention() if packing else "sdpa"), "segments"
