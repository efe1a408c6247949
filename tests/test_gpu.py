"""What only a CUDA GPU can show: half-precision sampling, model CPU offload moving weights between the GPU
and the CPU, and train.py's mixed precision. Skipped without a GPU (CI has none); run by
``benchmarks/gpu_check.sh`` when one is lent."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from axf_pipeline import AnomalyXFusionPipeline
from axf_pipeline.tiny import build_tiny_components

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def image_mask_reference(seed=0):
    rng = np.random.default_rng(seed)
    image = PIL.Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    mask = np.zeros((32, 32), np.uint8)
    mask[8:20, 10:22] = 255
    reference = PIL.Image.fromarray(rng.integers(0, 256, (40, 24, 3), dtype=np.uint8))
    return image, PIL.Image.fromarray(mask), reference


def call(pipe, seed=0, **overrides):
    image, mask, reference = image_mask_reference()
    args = dict(prompt="a scratch", image=image, mask_image=mask, reference_image=reference,
                num_inference_steps=3, guidance_scale=3.0, output_type="pil",
                generator=torch.Generator().manual_seed(seed))  # fmt: skip
    args.update(overrides)
    return pipe(**args)


def make_pipe(**kwargs) -> AnomalyXFusionPipeline:
    pipe = AnomalyXFusionPipeline(**build_tiny_components(**kwargs))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels", [4, 9])
def test_half_precision_on_cuda_keeps_the_background_exactly_and_fills_the_mask(dtype, channels):
    pipe = make_pipe(unet_in_channels=channels).to("cuda", dtype)
    assert all(m.dtype == dtype for m in (pipe.unet, pipe.vae, pipe.mif, pipe.ddf, pipe.image_encoder))
    image, mask, _ = image_mask_reference()
    result, src, m = np.array(call(pipe).images[0]), np.array(image), np.array(mask) > 0
    changed = (result != src).any(axis=-1)
    assert not changed[~m].any()
    assert changed[m].mean() > 0.9
    latents = call(pipe, output_type="latent").images
    assert latents.device.type == "cuda" and torch.isfinite(latents).all()


def test_model_cpu_offload_on_cuda_matches_the_pipeline_kept_on_the_gpu():
    on_gpu = make_pipe().to("cuda")
    expected = call(on_gpu, output_type="np").images
    offloaded = make_pipe()
    offloaded.enable_model_cpu_offload(device="cuda")
    assert offloaded._execution_device.type == "cuda"
    seen = {}

    def record(pipe, step, timestep, callback_kwargs):
        seen.setdefault("unet", pipe.unet.device.type)
        return callback_kwargs

    got = call(offloaded, output_type="np", callback_on_step_end=record).images
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert seen["unet"] == "cuda"  # the UNet was moved in for the denoising loop ...
    assert all(p.device.type == "cpu" for p in offloaded.unet.parameters())  # ... and out after the VAE


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_train_py_mixed_precision_on_cuda_trains_and_exports_fp32_weights(tmp_path, precision):
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed
    from training_setup import make_training_setup, training_argv

    from axf_pipeline.training import parse_args
    from axf_pipeline.training.loop import train

    AcceleratorState._reset_state(True)  # one process, two precisions: accelerate's state is a singleton
    fx = make_training_setup(tmp_path)
    out = tmp_path / "run"
    result = train(
        parse_args(training_argv(fx, out, "--max_train_steps", "3", "--mixed_precision", precision))
    )
    assert result.global_step == 3
    loaded = AnomalyXFusionPipeline.from_pretrained(out)
    for name in ("mif", "ddf"):
        params = list(getattr(loaded, name).parameters())
        assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in params), name
    set_seed(0)  # the fresh initialisation the run started from
    fresh = AnomalyXFusionPipeline.from_base(str(fx["base"]), image_encoder=str(fx["encoder"]))
    trained_w, fresh_w = loaded.mif.state_dict(), fresh.mif.state_dict()
    assert any(not torch.equal(trained_w[k], v) for k, v in fresh_w.items()), "MIF did not train"
    sample = call(loaded.to("cuda", torch.float16), output_type="latent").images
    assert torch.isfinite(sample).all()
