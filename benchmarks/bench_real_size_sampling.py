"""Sampling at real size: AnomalyXFusionPipeline vs diffusers' StableDiffusionInpaintPipeline on the same
Stable-Diffusion-1.5-shaped components (random weights, no download), same inputs, timed in one run.

What each side computes (per call, batch 1, CFG):
* both: the prompt and the empty negative prompt through the 12-layer CLIP text encoder; one VAE encode
  (the image for the 4-channel UNet's blending, the masked image for the 9-channel UNet; diffusers would
  also encode the masked image for a 4-channel UNet, unused: it gets placeholder latents to skip that); every step one
  UNet call on the batched [uncond, cond] latents and the scheduler step (4-channel: the latent blend
  with the noised original outside the mask, diffusers' and ours alike); one VAE decode.
* ours adds what the method needs: the ViT-L/14 CLIP image embedding of the reference defect (once per
  call), MIF (once per call) and DDF (once per step) on 768-wide tokens, the extra cross-attention tokens,
  and the composite that keeps the input's pixels outside the mask.
* ``--loco``: a 1600 × 1100 image with a small defect and ``padding_mask_crop``; both pipelines crop around
  the mask, generate at 512 × 512 and paste the crop back (PIL output, as diffusers requires there).

Target: ratio ≤ 1.03. With few steps the per-call costs (VAE, CLIP) weigh more than in a 50-step run.

    python benchmarks/bench_real_size_sampling.py [--unet-in-channels 4|9] [--loco] [--steps 2] [--repeats 2]
    python benchmarks/bench_real_size_sampling.py --profile   # where our call spends its time
    python benchmarks/bench_real_size_sampling.py --reference-embeds   # one reference embedded once
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import warnings

import numpy as np
import PIL.Image
import torch
from _timing import alternate, peak_rss_gb, report
from diffusers import StableDiffusionInpaintPipeline

from axf_pipeline import AnomalyXFusionPipeline
from axf_pipeline.tiny import build_sd15_components, stable_diffusion_pipeline

WORDS = ("a", "scratch", "on", "the", "surface")


def inputs(loco: bool, seed: int = 0):
    """A normal image, a small rectangular defect mask and a reference defect, all seeded."""
    rng = np.random.default_rng(seed)
    w, h = (1600, 1100) if loco else (512, 512)
    image = PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    mask = np.zeros((h, w), np.uint8)
    if loco:
        mask[600:680, 900:1010] = 255  # a small defect on a large, non-square image
    else:
        mask[h // 4 : h // 2, w // 3 : 3 * w // 4] = 255
    reference = PIL.Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))
    return image, PIL.Image.fromarray(mask), reference


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--unet-in-channels", type=int, choices=(4, 9), default=4)
    p.add_argument("--loco", action="store_true", help="1600x1100 image, small defect, padding_mask_crop")
    p.add_argument("--padding-mask-crop", type=int, default=32)
    p.add_argument("--size", type=int, default=512, help="generation size in pixels")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--warmup", type=int, default=0, help="untimed calls of each side first")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="weights' dtype (default: float16 on cuda, float32 on cpu)")  # fmt: skip
    p.add_argument("--offload", action="store_true", help="enable_model_cpu_offload on both (cuda)")
    p.add_argument("--profile", action="store_true", help="cProfile one call of ours instead of timing")
    p.add_argument("--reference-embeds", action="store_true",
                   help="ours gets the reference's CLIP embedding precomputed (reference_image_embeds=), "
                        "as a batch job with one reference would")  # fmt: skip
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("float16" if args.device == "cuda" else "float32"))

    c = build_sd15_components(unet_in_channels=args.unet_in_channels, words=WORDS)
    for name in ("vae", "text_encoder", "image_encoder", "unet", "mif", "ddf"):
        c[name].to("cpu" if args.offload else args.device)
        if dtype != torch.float32:
            c[name].to(dtype)
    ours = AnomalyXFusionPipeline(**c)
    theirs = stable_diffusion_pipeline(c, StableDiffusionInpaintPipeline, feature_extractor=False)
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
        if args.offload:  # each model moves to the GPU when used, and back
            pipe.enable_model_cpu_offload(device=args.device)
    image, mask, reference = inputs(args.loco)
    common = dict(
        prompt="a scratch on the surface",
        image=image,
        mask_image=mask,
        height=args.size,
        width=args.size,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        output_type="pil" if args.loco else "np",
    )
    if args.loco:
        common["padding_mask_crop"] = args.padding_mask_crop

    ref = dict(reference_image=reference)
    if args.reference_embeds:  # the ViT runs once here, outside the timed calls
        ref = dict(
            reference_image_embeds=ours.encode_reference_image(reference, height=args.size, width=args.size)
        )

    def run_ours():
        return ours(**common, **ref, generator=torch.Generator().manual_seed(0))

    # diffusers' inpaint pipeline VAE-encodes the masked image even for a 4-channel UNet, which never reads
    # it; handing it placeholder latents skips that unused encode, so the baseline does only useful work.
    unused = {}
    if args.unet_in_channels == 4:
        latent = args.size // ours.vae_scale_factor
        unused["masked_image_latents"] = torch.zeros(1, 4, latent, latent, device=args.device, dtype=dtype)

    def run_theirs():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # diffusers' note on 4-channel UNets in the inpaint pipeline
            return theirs(**common, **unused, generator=torch.Generator().manual_seed(0))

    what = (
        f"{args.size}px, {args.steps} steps, guidance {args.guidance_scale}, {args.unet_in_channels}-channel "
        f"SD-1.5-shaped UNet, {args.device} {str(dtype).removeprefix('torch.')}, torch threads "
        f"{torch.get_num_threads()}"
        + (f", LOCO 1600x1100 with padding_mask_crop={args.padding_mask_crop}" if args.loco else "")
        + (", ours with precomputed reference_image_embeds" if args.reference_embeds else "")  # fmt: skip
    )
    if args.profile:
        run_ours()  # warm-up
        prof = cProfile.Profile()
        prof.enable()
        run_ours()
        prof.disable()
        print(what)
        pstats.Stats(prof).sort_stats("cumulative").print_stats(35)
        return {}
    with torch.inference_mode():
        times = alternate({"AnomalyXFusionPipeline": run_ours, "StableDiffusionInpaintPipeline": run_theirs},
                          repeats=args.repeats, warmup=args.warmup)  # fmt: skip
    print(what)
    out = report(times, "AnomalyXFusionPipeline", "StableDiffusionInpaintPipeline", target=1.03)
    print(f"peak RSS {peak_rss_gb():.1f} GB", end="")
    if args.device == "cuda":
        print(f", peak GPU memory allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GB", end="")
    print(f"; seconds per image (ours, median): {out['median']['AnomalyXFusionPipeline']:.2f}")
    return out


if __name__ == "__main__":
    main()
