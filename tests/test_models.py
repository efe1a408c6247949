"""MultiModalInFusion and DynamicDifFusion: shapes, ablation switches, save/load (tiny, CPU)."""

from __future__ import annotations

import pytest
import torch

from axf_pipeline import DynamicDifFusion, MultiModalInFusion


def tiny_mif(**kwargs) -> MultiModalInFusion:
    torch.manual_seed(0)
    config = dict(
        cross_attention_dim=32,
        text_embed_dim=24,
        image_embed_dim=16,
        num_tokens=3,
        mask_size=32,
        mask_encoder_channels=(8, 16),
        mask_grid_size=4,
        num_attention_heads=4,
    )
    config.update(kwargs)
    return MultiModalInFusion(**config)


def mask_batch(b=2):
    mask = torch.zeros(b, 1, 40, 56)
    mask[:, :, 10:20, 5:30] = 1
    return mask


@pytest.mark.parametrize(
    "use_semantic, use_aggregator, tokens",
    [(True, True, 9), (True, False, 9), (False, True, 6), (False, False, 6)],
)
def test_mif_shapes_and_ablation_switches(use_semantic, use_aggregator, tokens):
    mif = tiny_mif(use_semantic=use_semantic, use_aggregator=use_aggregator)
    text = torch.randn(2, 24) if use_semantic else None
    e_x = mif(mask_batch(), text_embeds=text, image_embeds=torch.randn(2, 16))
    assert e_x.shape == (2, tokens, 32) == (2, mif.num_output_tokens, 32)
    has_aggregator = any(name.startswith("aggregator") for name, _ in mif.named_parameters())
    assert has_aggregator == use_aggregator


def test_mif_inputs_steer_the_embedding():
    mif = tiny_mif()
    mask, text, image = mask_batch(1), torch.randn(1, 24), torch.randn(1, 16)
    base = mif(mask, text, image)
    other_mask = torch.zeros_like(mask)
    other_mask[..., 30:, 40:] = 1
    assert not torch.allclose(base, mif(other_mask, text, image))
    assert not torch.allclose(base, mif(mask, torch.randn(1, 24), image))
    assert not torch.allclose(base, mif(mask, text, None))  # no reference = zero image embedding
    torch.testing.assert_close(mif(mask, text, None), mif(mask, text, torch.zeros(1, 16)))
    with pytest.raises(ValueError, match="text_embeds"):
        mif(mask, None, image)
    with pytest.raises(ValueError, match="batch"):
        mif(mask_batch(2), torch.randn(3, 24), None)


def test_semantic_tokens_are_scaled_l2_normalised_repeats_with_a_learned_projection():
    mif = tiny_mif(cross_attention_dim=24, num_attention_heads=4)  # same width: still a learned projection
    assert isinstance(mif.semantic_proj, torch.nn.Linear)
    text = torch.randn(2, 24) * 10
    tokens = mif.semantic_tokens(text)
    assert tokens.shape == (2, 3, 24)
    torch.testing.assert_close(tokens.norm(dim=-1), torch.full((2, 3), 24**0.5))
    assert torch.equal(tokens[:, 0], tokens[:, 2])


def test_ddf_starts_as_identity_then_depends_on_timestep():
    torch.manual_seed(0)
    ddf = DynamicDifFusion(cross_attention_dim=32, timestep_channels=16)
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(ddf(x, 999), x)
    torch.nn.init.normal_(ddf.mlp[-1].weight)  # as after training
    early, late = ddf(x, torch.tensor([10, 10])), ddf(x, torch.tensor(900))
    assert early.shape == (2, 5, 32) and not torch.allclose(early, late)
    with pytest.raises(ValueError, match="timesteps"):
        ddf(x, torch.tensor([1, 2, 3]))


def test_modules_round_trip_through_safetensors(tmp_path):
    mif, ddf = tiny_mif(use_aggregator=False), DynamicDifFusion(cross_attention_dim=32, timestep_channels=16)
    mif.save_pretrained(tmp_path / "mif")
    ddf.save_pretrained(tmp_path / "ddf")
    assert (tmp_path / "mif" / "diffusion_pytorch_model.safetensors").exists()
    mif2 = MultiModalInFusion.from_pretrained(tmp_path / "mif", use_safetensors=True)
    ddf2 = DynamicDifFusion.from_pretrained(tmp_path / "ddf", use_safetensors=True)
    assert mif2.config.use_aggregator is False and mif2.config.num_tokens == 3
    text, mask = torch.randn(1, 24), mask_batch(1)
    torch.testing.assert_close(mif2(mask, text), mif(mask, text))
    x = torch.randn(1, 4, 32)
    torch.testing.assert_close(ddf2(x, 5), ddf(x, 5))


def test_semantic_tokens_have_the_scale_of_layernormed_tokens_and_a_learned_gain():
    mif = tiny_mif()  # text width 24, cross-attention width 32: e_sem goes through a projection
    assert isinstance(mif.semantic_proj, torch.nn.Linear)
    with torch.no_grad():
        mif.semantic_proj.weight.mul_(7.0)  # a projection that does not preserve norms
    tokens = mif.semantic_tokens(torch.randn(2, 24) * 10)
    assert tokens.shape == (2, 3, 32)
    # eq. 1's L2 norm, then the gain at its initial sqrt(d): the norm of a LayerNorm'd token of width d
    torch.testing.assert_close(tokens.norm(dim=-1), torch.full((2, 3), 32**0.5))
    texture = mif.texture_tokens(torch.randn(2, mif.config.image_embed_dim))
    assert 0.5 < (tokens.norm(dim=-1).mean() / texture.norm(dim=-1).mean()).item() < 2.0
    tokens.sum().backward()
    assert mif.semantic_gain.grad is not None and mif.semantic_gain.grad.abs().sum() > 0
    with torch.no_grad():
        mif.semantic_gain.mul_(0.5)
    torch.testing.assert_close(
        mif.semantic_tokens(torch.randn(2, 24)).norm(dim=-1), torch.full((2, 3), 0.5 * 32**0.5)
    )
