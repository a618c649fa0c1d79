"""NEFTune noise: the alpha/sqrt(L_i d) bound with L_i = real tokens (per sequence or per packed segment),
no noise on pads, training mode only, and a removable hook on the embedding module's output."""

from __future__ import annotations

import math

import pytest
import torch

from unifit.training.neftune import NEFTuneHook, add_noise


def _mask(lengths: list[int], width: int) -> torch.Tensor:
    return torch.tensor([[1] * n + [0] * (width - n) for n in lengths])


def test_noise_bound_pads_and_per_sequence_scale() -> None:
    dim, alpha = 16, 10.0
    lengths = [3, 12]  # a short and a long sequence in one batch
    mask = _mask(lengths, 12)
    embeddings = torch.randn(2, 12, dim)
    noise = add_noise(embeddings, mask, alpha, generator=torch.Generator().manual_seed(0)) - embeddings
    for i, n in enumerate(lengths):
        bound = alpha / math.sqrt(n * dim)
        real = noise[i, :n].abs()
        assert real.max() <= bound + 1e-6
        assert real.max() > 0.9 * bound  # U(-1,1) over n*d draws reaches close to the bound
        assert torch.equal(noise[i, n:], torch.zeros_like(noise[i, n:]))  # pads untouched
    # uniform on [-b, b]: mean |eps| = b/2, so the two rows differ by sqrt(12/3) = 2x
    ratio = noise[0, :3].abs().mean() / noise[1, :12].abs().mean()
    assert ratio == pytest.approx(2.0, rel=0.25)


def test_padded_length_does_not_change_the_scale() -> None:
    """The same sequence padded to 8 or to 64 gets the same noise distribution (HF's hook would shrink it)."""
    dim, alpha = 32, 5.0
    short = add_noise(torch.zeros(1, 8, dim), _mask([4], 8), alpha, generator=torch.Generator().manual_seed(1))
    long = add_noise(torch.zeros(1, 64, dim), _mask([4], 64), alpha, generator=torch.Generator().manual_seed(1))
    bound = alpha / math.sqrt(4 * dim)
    for noised in (short, long):
        assert noised[0, :4].abs().max() <= bound + 1e-6
        assert noised[0, :4].abs().max() > 0.9 * bound
        assert noised[0, 4:].abs().max() == 0


def test_packed_segments_scale_by_their_own_length() -> None:
    dim, alpha = 8, 15.0
    segments = torch.tensor([[0] * 2 + [1] * 18 + [2] * 4])  # segment 2 is trailing padding
    mask = torch.tensor([[1] * 20 + [0] * 4])
    noise = add_noise(torch.zeros(1, 24, dim), mask, alpha, segment_ids=segments, generator=torch.Generator().manual_seed(2))
    first, second = noise[0, :2].abs(), noise[0, 2:20].abs()
    assert first.max() <= alpha / math.sqrt(2 * dim) + 1e-6
    assert first.max() > alpha / math.sqrt(20 * dim)  # larger than a whole-row scale would allow
    assert second.max() <= alpha / math.sqrt(18 * dim) + 1e-6
    assert second.max() > 0.9 * alpha / math.sqrt(18 * dim)
    assert noise[0, 20:].abs().max() == 0


def test_alpha_zero_is_identity() -> None:
    embeddings = torch.randn(2, 5, 4)
    assert add_noise(embeddings, _mask([5, 2], 5), 0.0) is embeddings


def test_hook_noises_in_training_only_and_removes(tiny_model_cfg, cache_dir) -> None:
    from unifit.models import load_model

    model = load_model(tiny_model_cfg, cache_dir)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = _mask([4, 2], 4)
    embed = model.get_input_embeddings()
    clean = embed(ids).detach()
    hook = NEFTuneHook(alpha=5.0, generator=torch.Generator().manual_seed(0))
    handle = hook.attach(model)

    model.eval()
    hook.attention_mask = mask
    assert torch.equal(embed(ids), clean)  # eval: no-op

    model.train()
    noisy = embed(ids).detach()
    dim = clean.shape[-1]
    assert not torch.equal(noisy, clean)
    assert (noisy - clean)[0].abs().max() <= 5.0 / math.sqrt(4 * dim) + 1e-6
    assert torch.equal(noisy[1, 2:], clean[1, 2:])  # pads untouched through the hook too
    with torch.no_grad():  # the hook is on the module the model really calls
        model(input_ids=ids, attention_mask=mask)

    hook.attention_mask = _mask([3], 3)  # stale mask from another batch shape: refuse, never mis-scale
    with pytest.raises(RuntimeError, match="attention_mask"):
        embed(ids)

    handle.remove()
    assert torch.equal(embed(ids), clean)  # removed: training mode, no noise


def test_hook_on_a_lora_model_noises_the_frozen_embeddings_and_lora_trains(tiny_model_cfg, cache_dir) -> None:
    """PEFT wraps the model and freezes the embeddings: the hook still sits on the module the forward calls."""
    import peft  # dev extra: a missing install fails here rather than skipping
    from unifit.models import load_model

    model = peft.get_peft_model(load_model(tiny_model_cfg, cache_dir),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = _mask([4, 2], 4)
    embed = model.get_input_embeddings()
    assert not embed.weight.requires_grad
    clean = embed(ids).detach()
    seen: list[torch.Tensor] = []
    hook = NEFTuneHook(alpha=5.0, generator=torch.Generator().manual_seed(0))
    handle = hook.attach(model)
    embed.register_forward_hook(lambda module, inputs, output: seen.append(output.detach()))  # runs after NEFTune's

    model.train()
    hook.attention_mask = mask
    loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    loss.backward()
    noise = seen[-1] - clean
    assert noise[0].abs().max() <= 5.0 / math.sqrt(4 * clean.shape[-1]) + 1e-6 and noise[0].abs().max() > 0
    assert torch.equal(noise[1, 2:], torch.zeros_like(noise[1, 2:]))  # pads untouched
    lora = [p for name, p in model.named_parameters() if "lora_" in name]
    assert lora and all(p.grad is not None for p in lora) and any(p.grad.abs().sum() > 0 for p in lora)

    model.eval()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert torch.equal(seen[-1], clean)  # eval: no-op
    handle.remove()
