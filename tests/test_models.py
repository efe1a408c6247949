"""MultiModalInFusion and DynamicDifFusion: shapes, ablation switches, save/load (tiny, CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

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


def test_mif_aggregator_adds_the_refined_tokens_to_the_concatenated_modalities():
    """Paper §4.2: ``e_X + MLP(SelfAttn(LN(e_X)))``, rebuilt by hand from the module's own parts."""
    mif, plain = tiny_mif(), tiny_mif(use_aggregator=False)  # same seed: the same modality weights
    mask, text, image = mask_batch(2), torch.randn(2, 24), torch.randn(2, 16)
    with torch.no_grad():
        e_x = torch.cat([mif.semantic_tokens(text), mif.location_tokens(mask), mif.texture_tokens(image)], 1)
        h = mif.aggregator_norm(e_x)
        refined = e_x + mif.aggregator_mlp(mif.aggregator_attn(h, h, h)[0])
        assert not torch.allclose(refined, e_x)  # the refinement is not negligible: its sign shows
        torch.testing.assert_close(plain(mask, text, image), e_x)
        torch.testing.assert_close(mif(mask, text, image), refined)


def test_mask_encoder_halves_the_mask_per_layer_and_checkpoint_shapes_follow_the_config():
    """E_mask is stride-2 3×3 convolutions with padding 1 (a side of n becomes ceil(n / 2)); a released
    checkpoint loads only while every weight keeps the shape the config implies."""
    channels, grid, k, d = (8, 16, 8), 4, 3, 32
    mif = tiny_mif(mask_size=36, mask_encoder_channels=channels, mask_grid_size=grid)  # odd sides: 18, 9, 5
    sides = []
    for layer in mif.mask_encoder.net:
        if isinstance(layer, torch.nn.Conv2d):
            layer.register_forward_hook(lambda module, args, out: sides.append(tuple(out.shape[-2:])))
    assert mif.location_tokens(mask_batch(2)).shape == (2, k, d)
    assert sides == [(18, 18), (9, 9), (5, 5)]
    expected = {}
    for i, (c_in, c_out) in enumerate(zip((1, *channels[:-1]), channels, strict=True)):
        expected[f"mask_encoder.net.{2 * i}.weight"] = (c_out, c_in, 3, 3)
        expected[f"mask_encoder.net.{2 * i}.bias"] = (c_out,)
    expected |= {
        "location_conv.weight": (k, channels[-1], 1, 1),
        "location_conv.bias": (k,),
        "location_fc.weight": (d, grid * grid),
        "location_fc.bias": (d,),
    }
    shapes = {n: tuple(v.shape) for n, v in mif.state_dict().items() if n.startswith(("mask_", "location_"))}
    assert shapes == expected


def test_location_tokens_see_the_mask_area_averaged_so_thin_defects_survive_the_resize():
    """The mask reaches E_mask resized by area: each cell holds the fraction of it the defect covers, so
    a one-pixel scratch still moves the tokens where nearest-neighbour resizing could skip its row."""
    mif = tiny_mif()  # mask_size 32
    seen = []
    mif.mask_encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    mask = (torch.rand(2, 1, 128, 128, generator=torch.Generator().manual_seed(0)) > 0.7).float()
    mif.location_tokens(mask)
    torch.testing.assert_close(seen[0], F.avg_pool2d(mask, 4))  # each 4×4 block's covered fraction
    scratch = torch.zeros(1, 1, 128, 128)
    scratch[..., 1, :] = 1  # row 1: nearest-neighbour resizing to 32 samples rows 0, 4, 8, ...
    assert not torch.allclose(mif.location_tokens(scratch), mif.location_tokens(torch.zeros_like(scratch)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_mif_takes_float32_inputs_and_returns_its_own_dtype(dtype):
    """The pipeline casts MIF to fp16/bf16 while CLIP embeddings and masks may arrive as float32 or bool."""
    ref, half = tiny_mif(), tiny_mif().to(dtype)
    mask, text, image = mask_batch(2), torch.randn(2, 24), torch.randn(2, 16)
    for image_embeds in (image, None):  # None: the zero "no reference" embedding
        out = half(mask, text, image_embeds)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ref(mask, text, image_embeds), atol=0.05, rtol=0.02)
    torch.testing.assert_close(half(mask.bool(), text), half(mask, text))


def test_the_zero_reference_embedding_is_made_on_the_masks_device():
    """Without a reference the zero image embedding must live with the module and the mask (a GPU in use);
    the meta device stands in for one here: a CPU tensor meeting meta weights fails as on a GPU."""
    mif = tiny_mif().to("meta")
    out = mif(mask_batch(2).to("meta"), torch.empty(2, 24, device="meta"))
    assert out.device.type == "meta" and out.shape == (2, 9, 32)


def test_mif_errors_name_the_missing_input_and_the_modality_whose_batch_differs():
    mif, mask = tiny_mif(), mask_batch(2)
    with pytest.raises(ValueError, match=r"^MultiModalInFusion\(use_semantic=True\) needs `text_embeds`\.$"):
        mif(mask, None)
    with pytest.raises(ValueError, match=r"^MultiModalInFusion: semantic batch 5 != mask batch 2$"):
        mif(mask, torch.randn(5, 24))
    with pytest.raises(ValueError, match=r"^MultiModalInFusion: texture batch 5 != mask batch 2$"):
        mif(mask, torch.randn(2, 24), torch.randn(5, 16))
    no_text = tiny_mif(use_semantic=False)  # table 6's ablation: still the texture, not the next name
    with pytest.raises(ValueError, match=r"^MultiModalInFusion: texture batch 5 != mask batch 2$"):
        no_text(mask, None, torch.randn(5, 16))
