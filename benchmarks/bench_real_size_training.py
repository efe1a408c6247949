"""Training at real size: one AnomalyXFusion step with a UNet LoRA and gradient checkpointing vs a plain
diffusers LoRA noise-prediction step on the same Stable-Diffusion-1.5-shaped parts (random weights), and
the peak memory of that step broken down by part, with the effect of each memory lever.

``time`` (target ≤ 1.10): both steps encode the 512 px crop with the VAE and the caption with the text
encoder, run the UNet (LoRA rank 4 on to_q/k/v/out, gradient checkpointing) and take an AdamW step;
ours adds the ViT-L/14 embedding of the reference defect, MIF, DDF, the masked loss, and trains MIF/DDF
too (bench_training.py's steps, at real size; one shared set of weights).

``memory``: the same step of ours, each lever set in a fresh process (CPU: peak RSS, reset before the
step; GPU: torch.cuda.max_memory_allocated), split into frozen weights, trainable weights + gradients +
optimizer state, and activations (peak during the step minus what was held before it).

    python benchmarks/bench_real_size_training.py time [--repeats 2] [--steps 1] [--warmup 0]
    python benchmarks/bench_real_size_training.py memory [--levers +checkpointing "+half frozen" ...]

On a CPU only the fp32 + checkpointing step is measured by default (half-precision compute is emulated
without AVX512-BF16, and the fp32 step without checkpointing exceeds a 12 GB machine); the weight savings
of the other levers are then computed exactly from the parameters.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time

import torch
from _timing import alternate, held_memory, peak_memory, report, reset_peak_memory
from bench_training import baseline_step, make_batch, ours_step

from axf_pipeline.tiny import build_sd15_components
from axf_pipeline.training.model import (
    BatchEncoder,
    XFusionDenoiser,
    compute_loss,
    set_trainable,
    step_generator,
)

WORDS = ("a", "scratch", "number", "on", "the", "surface")
# Each lever set adds one lever to the previous one (the order a user would reach for them).
LEVERS = {
    "fp32": dict(),
    "+checkpointing": dict(checkpointing=True),
    "+half frozen": dict(checkpointing=True, half=True),
    "+text cached": dict(checkpointing=True, half=True, text_cached=True),
    "+latents cached": dict(checkpointing=True, half=True, text_cached=True, latents_cached=True),
}


def build(device: str, half: bool, checkpointing: bool, lora_rank: int):
    c = build_sd15_components(words=WORDS, scheduler="ddpm")
    weight_dtype = (torch.float16 if device == "cuda" else torch.bfloat16) if half else torch.float32
    set_trainable(c, "frozen", lora_rank, device=device, weight_dtype=weight_dtype)
    if checkpointing:
        c["unet"].enable_gradient_checkpointing()
    denoiser = XFusionDenoiser(c["unet"], c["mif"], c["ddf"])
    encoder = BatchEncoder(c["vae"], c["text_encoder"], c["tokenizer"], c["image_encoder"],
                           c["feature_extractor"], c["scheduler"])  # fmt: skip
    return c, denoiser, encoder, weight_dtype


def autocast(device: str, dtype: torch.dtype):
    """Mixed precision as accelerate applies it for fp16/bf16 weights; nothing for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device, dtype=dtype)


def build_vae_encoder_params(c):
    vae = c["vae"]
    return [
        p for m in (vae.encoder, vae.quant_conv) if m is not None for p in m.parameters() if not p.is_meta
    ]


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# ----------------------------------------------------------------------------- time (item 3)


def time_main(args) -> dict:
    torch.set_num_threads(args.threads)
    half = args.device == "cuda"
    c, denoiser, encoder, dtype = build(args.device, half, True, args.lora_rank)
    lora = [p for p in c["unet"].parameters() if p.requires_grad]
    ours_params = [p for p in denoiser.parameters() if p.requires_grad]
    base_state = (c, denoiser, torch.optim.AdamW(lora, lr=1e-4), None)
    ours_state = (c, denoiser, torch.optim.AdamW(ours_params, lr=1e-4), encoder)
    batch = make_batch(args.batch_size, args.resolution)
    counter = iter(range(10**6))

    def side(step, state):
        def run():
            with autocast(args.device, dtype):
                for _ in range(args.steps):
                    step(state, batch, next(counter))

        return run

    times = alternate(
        {
            "AnomalyXFusion step": side(ours_step, ours_state),
            "diffusers LoRA step": side(baseline_step, base_state),
        },
        repeats=args.repeats,
        warmup=args.warmup,
    )
    print(
        f"{args.resolution}px, batch {args.batch_size}, UNet LoRA rank {args.lora_rank} + gradient checkpointing, "
        f"SD-1.5-shaped parts, {args.device} {str(dtype).removeprefix('torch.')}, torch threads "
        f"{torch.get_num_threads()}, {args.steps} step(s) per timing; trained: LoRA "
        f"{sum(p.numel() for p in lora) / 1e6:.2f} M (+ MIF/DDF {(sum(p.numel() for p in ours_params) - sum(p.numel() for p in lora)) / 1e6:.2f} M ours)"
    )
    return report(times, "AnomalyXFusion step", "diffusers LoRA step", target=1.10)


# ----------------------------------------------------------------------------- memory (item 4)


def one_lever_set(args) -> dict:
    """Runs in its own process: builds, applies the levers, measures one training step of ours."""
    torch.set_num_threads(args.threads)
    lv = LEVERS[args.lever]
    c, denoiser, encoder, dtype = build(args.device, lv.get("half", False), lv.get("checkpointing", False),
                                        args.lora_rank)  # fmt: skip
    params = [p for p in denoiser.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    batch = make_batch(args.batch_size, args.resolution)
    vae_encoder = nbytes(c["vae"].encoder.parameters())  # what caching latents lets go
    encoder.cache_latents = lv.get("latents_cached", False)
    if lv.get("text_cached"):  # the fixed captions, embedded once; the text encoder then leaves memory
        encoder._text_embeds(batch["caption"])
        c["text_encoder"].to("meta")
    if encoder.cache_latents:  # fixed crops: latents once; the VAE is not needed during training steps
        with torch.no_grad(), autocast(args.device, dtype):
            encoder._latent_params(batch["pixel_values"].to(args.device), batch["key"])
        c["vae"].encoder = None  # gone (moving it to "meta" would make vae.device, the batch's device, meta)
    frozen = {name: nbytes(p for p in c[name].parameters() if not p.requires_grad and not p.is_meta)
              for name in ("unet", "vae", "text_encoder", "image_encoder")}  # fmt: skip

    def step(i):
        with autocast(args.device, dtype):
            loss = compute_loss(denoiser, encoder(batch, step_generator(0, i, 0)), 1.0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    before = held_memory()  # the first step's peak also holds the AdamW state it creates
    reset_peak_memory()
    t0 = time.perf_counter()
    step(0)
    seconds = time.perf_counter() - t0
    peak = peak_memory()
    opt_state = nbytes(t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    return {
        "lever": args.lever,
        "peak": peak,
        "held_before_step": before,
        "frozen": frozen,
        "trainable": nbytes(params),
        "optimizer_state": opt_state,
        "activations": peak - before,
        "vae_encoder": vae_encoder,
        "seconds": seconds,
    }


def memory_main(args) -> list[dict]:
    names = args.levers or (list(LEVERS) if args.device == "cuda" else ["+checkpointing"])
    rows = []
    for name in names:
        cmd = [sys.executable, __file__, "_one", "--lever", name, "--device", args.device,
               "--threads", str(args.threads), "--resolution", str(args.resolution),
               "--batch-size", str(args.batch_size), "--lora-rank", str(args.lora_rank)]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            print(f"  {name}: FAILED\n{out.stderr[-3000:]}", file=sys.stderr, flush=True)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"  {name}: done ({rows[-1]['seconds']:.1f} s step)", file=sys.stderr, flush=True)
    gb = 1 / 2**30
    kind = "peak allocated (GPU)" if args.device == "cuda" else "peak RSS (CPU, whole process)"
    print(f"\nOne AnomalyXFusion training step at {args.resolution}px, batch {args.batch_size}, UNet LoRA rank "
          f"{args.lora_rank}, {args.device}; {kind}, GB")  # fmt: skip
    print("| levers | peak | frozen weights (UNet / VAE / text / image) | trainable + grads + AdamW | activations "
          "| step s |\n|---|---|---|---|---|---|")  # fmt: skip

    def line(r, peak, note=""):
        f = r["frozen"]
        train = 2 * r["trainable"] + r["optimizer_state"]  # weights, gradients, Adam moments
        print(
            f"| {r['lever']}{note} | {peak} | {sum(f.values()) * gb:.2f} ({f['unet'] * gb:.2f} / {f['vae'] * gb:.2f}"
            f" / {f['text_encoder'] * gb:.2f} / {f['image_encoder'] * gb:.2f}) | {train * gb:.3f} | "
            f"{r['activations'] * gb:.2f} | {r['seconds']:.1f} |"
        )

    for r in rows:
        line(r, f"{r['peak'] * gb:.2f}")
    measured = {r["lever"] for r in rows}
    if "+checkpointing" in measured and len(measured) < len(LEVERS):
        # the levers not run here change the frozen weights exactly as computed below (activations and
        # the rest as measured with fp32 weights: an upper bound, half-precision activations are smaller)
        r = next(r for r in rows if r["lever"] == "+checkpointing")
        f = dict(r["frozen"])
        for name in list(LEVERS)[2:]:
            if name in measured:
                continue
            if name == "+half frozen":
                f = {k: v // 2 for k, v in f.items()}
            elif name == "+text cached":
                f["text_encoder"] = 0
            elif name == "+latents cached":
                f["vae"] -= r["vae_encoder"] // 2
            est = dict(r, lever=name, frozen=dict(f), seconds=float("nan"))
            saved = sum(r["frozen"].values()) - sum(f.values())
            line(est, f"≤ {(r['peak'] - saved) * gb:.2f}", " (computed)")
    print(
        "8-bit Adam would only shrink the AdamW column (no maintained 8-bit optimizer is a dependency here)."
    )
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("time", "memory", "_one"))
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--lora-rank", type=int, default=4)
    p.add_argument("--steps", type=int, default=1, help="training steps per timing")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--warmup", type=int, default=0, help="untimed steps of each side first")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--levers", nargs="+", choices=list(LEVERS), default=None,
                   help="lever sets to measure (default: all on cuda; on cpu +checkpointing, the rest computed)")  # fmt: skip
    p.add_argument("--lever", choices=list(LEVERS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.what == "time":
        return time_main(args)
    if args.what == "memory":
        return memory_main(args)
    print(json.dumps(one_lever_set(args)))


if __name__ == "__main__":
    main()
