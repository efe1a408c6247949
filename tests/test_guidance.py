"""Text and reference as separate conditions (InstructPix2Pix's two-condition guidance): which branches the
UNet sees, how their predictions combine, and what it costs in UNet passes."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from axf_pipeline import AnomalyXFusionPipeline
from axf_pipeline.pipeline_anomaly_x_fusion import combine_guidance, guidance_branches
from axf_pipeline.tiny import build_tiny_components


@pytest.fixture(scope="module")
def pipe():
    pipe = AnomalyXFusionPipeline(**build_tiny_components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def known_unet_forward(seen: list):
    """A UNet forward whose prediction for each sample is a constant that depends only on its
    cross-attention tokens (so the output per condition is known); it records the tokens it saw."""

    def forward(sample, t, encoder_hidden_states, **kwargs):
        seen.append(encoder_hidden_states.clone())
        value = encoder_hidden_states.flatten(1).sin().sum(1)  # one number per condition
        return (value[:, None, None, None].expand(-1, 4, *sample.shape[-2:]).to(sample.dtype),)

    return forward


def run_with_known_unet(pipe, monkeypatch, **kwargs):
    """One denoising step; returns the tokens of each UNet pass and the noise the scheduler was given."""
    seen = []
    monkeypatch.setattr(pipe.unet, "forward", known_unet_forward(seen))
    given = []
    step = pipe.scheduler.step

    def record(noise_pred, t, latents, **kw):
        given.append(noise_pred.clone())
        return step(noise_pred, t, latents, **kw)

    monkeypatch.setattr(pipe.scheduler, "step", record)
    rng = np.random.default_rng(0)
    image = PIL.Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    mask = np.zeros((32, 32), np.uint8)
    mask[8:20, 10:22] = 255
    reference = PIL.Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    args = dict(prompt="a scratch", image=image, mask_image=PIL.Image.fromarray(mask), num_inference_steps=1,
                reference_image=reference, reference_mask=PIL.Image.fromarray(mask), output_type="latent",
                generator=torch.Generator().manual_seed(0))  # fmt: skip
    args.update(kwargs)
    pipe(**args)
    return seen[0], given[0]


def branch_values(tokens: torch.Tensor, n: int) -> list[torch.Tensor]:
    return [chunk.flatten(1).sin().sum(1) for chunk in tokens.chunk(n)]


def test_different_scales_combine_three_branches_by_the_two_condition_formula(pipe, monkeypatch):
    s_txt, s_ref = 5.0, 2.0
    tokens, noise = run_with_known_unet(
        pipe, monkeypatch, guidance_scale=s_txt, reference_guidance_scale=s_ref
    )
    assert tokens.shape[0] == 3  # (∅,∅), (∅,ref), (txt,ref)
    uncond, reference, full = tokens.chunk(3)
    n_prompt = pipe.tokenizer.model_max_length
    # the reference-only branch has the unconditional prompt tokens and the full branch's reference
    torch.testing.assert_close(reference[:, :n_prompt], uncond[:, :n_prompt])
    assert not torch.allclose(full[:, :n_prompt], reference[:, :n_prompt])
    assert not torch.allclose(reference[:, n_prompt:], uncond[:, n_prompt:])
    u, r, f = branch_values(tokens, 3)
    expected = u + s_ref * (r - u) + s_txt * (f - r)
    torch.testing.assert_close(noise[:, 0, 0, 0], expected)


@pytest.mark.parametrize("scales", [(4.0, None), (4.0, 4.0)])
def test_equal_scales_are_plain_cfg_with_two_passes(pipe, monkeypatch, scales):
    s_txt, s_ref = scales
    tokens, noise = run_with_known_unet(
        pipe, monkeypatch, guidance_scale=s_txt, reference_guidance_scale=s_ref
    )
    assert tokens.shape[0] == 2  # no extra UNet pass at the defaults
    u, f = branch_values(tokens, 2)
    torch.testing.assert_close(noise[:, 0, 0, 0], u + s_txt * (f - u))


def test_both_scales_at_one_give_the_full_condition_in_one_pass(pipe, monkeypatch):
    tokens, noise = run_with_known_unet(pipe, monkeypatch, guidance_scale=1.0, reference_guidance_scale=1.0)
    assert tokens.shape[0] == 1
    (f,) = branch_values(tokens, 1)
    torch.testing.assert_close(noise[:, 0, 0, 0], f)
    # and the full condition is the same tokens as the full branch of a guided call
    guided, _ = run_with_known_unet(pipe, monkeypatch, guidance_scale=3.0, reference_guidance_scale=2.0)
    torch.testing.assert_close(guided.chunk(3)[2], tokens)


def test_without_a_reference_only_the_text_scale_counts(pipe, monkeypatch):
    tokens, noise = run_with_known_unet(
        pipe,
        monkeypatch,
        guidance_scale=3.0,
        reference_guidance_scale=9.0,
        reference_image=None,
        reference_mask=None,
    )
    assert tokens.shape[0] == 2
    u, f = branch_values(tokens, 2)
    torch.testing.assert_close(noise[:, 0, 0, 0], u + 3.0 * (f - u))


def test_branch_rule_and_combination_formula():
    assert guidance_branches(True, True, 4.0, 4.0) == (("uncond", "full"), 4.0)
    assert guidance_branches(True, True, 4.0, 2.0)[0] == ("uncond", "reference", "full")
    assert guidance_branches(True, False, 3.0, 7.0) == (("uncond", "full"), 3.0)
    assert guidance_branches(False, True, 3.0, 7.0) == (("uncond", "full"), 7.0)  # a no-text model
    assert guidance_branches(False, False, 3.0, 7.0) == (("full",), 1.0)
    assert guidance_branches(True, True, 1.0, 1.0) == (("full",), 1.0)
    assert guidance_branches(True, False, 0.5, 7.0) == (("full",), 1.0)
    u, r, f = torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([5.0])
    stacked = torch.cat([u, r, f])
    out = combine_guidance(stacked, ("uncond", "reference", "full"), 3.0, 0.5, 3.0)
    torch.testing.assert_close(out, u + 0.5 * (r - u) + 3.0 * (f - r))
    # s_ref = s_txt: the reference branch cancels and it is plain CFG
    out = combine_guidance(stacked, ("uncond", "reference", "full"), 2.0, 2.0, 2.0)
    torch.testing.assert_close(out, u + 2.0 * (f - u))


def test_negative_reference_guidance_scale_is_refused(pipe):
    image = PIL.Image.new("RGB", (32, 32))
    mask = PIL.Image.new("L", (32, 32), 255)
    with pytest.raises(ValueError, match="reference_guidance_scale must be >= 0"):
        pipe(prompt="a", image=image, mask_image=mask, num_inference_steps=1, reference_guidance_scale=-1.0)
