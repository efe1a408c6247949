"""Training-step cost of AnomalyXFusion vs a plain diffusers noise-prediction step, in one run.

Both steps use the same UNet, VAE, text encoder, batch and resolution, train the same UNet weights
(a LoRA, or the whole UNet) with AdamW, and encode the caption every step. Ours adds what the paper
adds: the CLIP image embedding of the reference defect, the MIF X-embedding, DDF, and the masked loss,
and trains MIF/DDF too. Reported: the median time of each and the ratio (target ≤ 1.15).

    python benchmarks/bench_training.py [--resolution 64] [--batch_size 4] [--unet lora|full]

Tiny components (``axf_pipeline.tiny``) on CPU by default; ``--device cuda`` on a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from axf_pipeline.conditioning import encode_text
from axf_pipeline.tiny import build_tiny_components
from axf_pipeline.training.model import (
    BatchEncoder,
    XFusionDenoiser,
    compute_loss,
    set_trainable,
    step_generator,
)


def make_batch(batch_size: int, resolution: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch_size, 1, resolution, resolution)
    mask[:, :, resolution // 4 : resolution // 2, resolution // 3 : 2 * resolution // 3] = 1
    return {
        "pixel_values": torch.rand(batch_size, 3, resolution, resolution, generator=g) * 2 - 1,
        "mask": mask,
        "reference": torch.rand(batch_size, 3, resolution, resolution, generator=g),
        "reference_mask": mask.clone(),
        "has_reference": torch.ones(batch_size, dtype=torch.bool),
        "caption": [f"a scratch number {i} on the surface" for i in range(batch_size)],
        "key": [(i,) for i in range(batch_size)],
    }


def build(args, ours: bool):
    c = build_tiny_components(
        sample_size=args.resolution,
        block_out_channels=tuple(args.block_out_channels),
        words=("a", "scratch", "number", "on", "the", "surface"),
        scheduler="ddpm",
        seed=0,
    )
    set_trainable(c, "full" if args.unet == "full" else "frozen", args.lora_rank if args.unet == "lora" else 0,
                  device=args.device)  # fmt: skip
    if not ours:
        c["mif"].requires_grad_(False)
        if c["ddf"] is not None:
            c["ddf"].requires_grad_(False)
    denoiser = XFusionDenoiser(c["unet"], c["mif"], c["ddf"])
    params = [p for p in denoiser.parameters() if p.requires_grad]
    return c, denoiser, torch.optim.AdamW(params, lr=1e-4)


def ours_step(state, batch, i):
    c, denoiser, optimizer, encoder = state
    encoder._text.clear()  # encode the caption every step, as the baseline does
    loss = compute_loss(denoiser, encoder(batch, step_generator(0, i, 0)), 1.0)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def baseline_step(state, batch, i):
    """diffusers' text-to-image training step: VAE latents, noise, UNet on the prompt tokens, MSE."""
    c, denoiser, optimizer, _ = state
    g = step_generator(0, i, 0)
    device = c["vae"].device
    with torch.no_grad():
        latents = c["vae"].encode(batch["pixel_values"].to(device)).latent_dist.sample(generator=g)
        latents = latents * c["vae"].config.scaling_factor
        prompt_embeds, _ = encode_text(c["tokenizer"], c["text_encoder"], batch["caption"], device)
    noise = torch.randn(latents.shape, generator=g).to(device)
    t = torch.randint(0, c["scheduler"].config.num_train_timesteps, (latents.shape[0],), generator=g).to(
        device
    )
    noisy = c["scheduler"].add_noise(latents, noise, t)
    pred = c["unet"](noisy, t, encoder_hidden_states=prompt_embeds).sample
    loss = F.mse_loss(pred.float(), noise.float())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def timed(step, state, batch, steps: int, offset: int) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(steps):
        step(state, batch, offset + i)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--block_out_channels", type=int, nargs="+", default=[32, 64])
    p.add_argument("--unet", choices=("lora", "full"), default="lora")
    p.add_argument("--lora_rank", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="steps per timing")
    p.add_argument("--repeats", type=int, default=5, help="alternating timings of each; the median is kept")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = make_batch(args.batch_size, args.resolution)
    states = {}
    for name, ours in (("baseline", False), ("anomalyxfusion", True)):
        c, denoiser, optimizer = build(args, ours)
        encoder = BatchEncoder(c["vae"], c["text_encoder"], c["tokenizer"], c["image_encoder"],
                               c["feature_extractor"], c["scheduler"])  # fmt: skip
        states[name] = (c, denoiser, optimizer, encoder)
    steps = {"baseline": baseline_step, "anomalyxfusion": ours_step}
    for name in steps:  # warm-up
        timed(steps[name], states[name], batch, 2, 0)
    times = {name: [] for name in steps}
    for r in range(args.repeats):
        for name in steps if r % 2 == 0 else reversed(list(steps)):
            times[name].append(timed(steps[name], states[name], batch, args.steps, 100 * (r + 1)))
    med = {name: statistics.median(v) for name, v in times.items()}
    ratio = med["anomalyxfusion"] / med["baseline"]
    print(
        f"device={args.device} threads={torch.get_num_threads()} resolution={args.resolution} "
        f"batch={args.batch_size} unet={args.unet}"
        + (f" (LoRA rank {args.lora_rank})" if args.unet == "lora" else "")
    )
    print(f"plain diffusers noise-prediction step: {med['baseline'] * 1000:.1f} ms")
    print(f"AnomalyXFusion training step:          {med['anomalyxfusion'] * 1000:.1f} ms")
    print(f"ratio: {ratio:.3f} (target <= 1.15)")
    return {"baseline_s": med["baseline"], "ours_s": med["anomalyxfusion"], "ratio": ratio}


if __name__ == "__main__":
    main()
