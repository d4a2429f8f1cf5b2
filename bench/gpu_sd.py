"""50-step CFG sampling on an SD-1.5-architecture model (random weights): ours vs the network-only floor
vs diffusers' StableDiffusionPipeline (DDIM), printed as ratios from one run.

    python bench/gpu_sd.py                          # CUDA, fp16, 512² (64² latents), batch 1
    python bench/gpu_sd.py --device cpu --tiny      # a tiny model on the CPU, to check the script works

The components are built with random weights (UNet2DConditionModel defaults with SD 1.5's 768-d cross
attention, SD's VAE and CLIP text encoder shapes), saved with ``save_pretrained`` and loaded back with
``kdiff_align.from_pretrained``; nothing is downloaded. Target: ours ÷ floor ≤ 1.02.
Reference (H100): UNet b1 23.4 ms, b8 31.4 ms; diffusers 1.49 s/image vs a 1.42 s floor.
"""
import argparse
import string
import tempfile
import time
from pathlib import Path

import diffusers
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import kdiff_align as ka

SD15_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                  clip_sample=False, set_alpha_to_one=False)


def char_tokenizer() -> CLIPTokenizer:
    """A character-level CLIP tokenizer (the benchmark does not care about the words, only the shapes)."""
    chars = string.ascii_lowercase + string.digits + ".,!?'-"
    tokens = ["<|startoftext|>", "<|endoftext|>"] + list(chars) + [c + "</w>" for c in chars]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=77)


def build(root: Path, tiny: bool) -> None:
    """Save random-weight SD-1.5-shaped (or tiny) components as a diffusers folder."""
    torch.manual_seed(0)
    if tiny:
        unet = diffusers.UNet2DConditionModel(
            sample_size=8, layers_per_block=1, block_out_channels=(16, 32), norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=4)
        vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), norm_num_groups=8, latent_channels=4,
                                      down_block_types=("DownEncoderBlock2D",) * 2,
                                      up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16)
        text = CLIPTextConfig(vocab_size=96, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                              num_attention_heads=4, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    else:
        unet = diffusers.UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # defaults = SD 1.5
        vae = diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                                      down_block_types=("DownEncoderBlock2D",) * 4,
                                      up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)
        text = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              bos_token_id=0, eos_token_id=1, pad_token_id=1)  # vocab 49408 as CLIP's
    unet.save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae")
    diffusers.DDIMScheduler(**SD15_BETAS).save_pretrained(root / "scheduler")
    char_tokenizer().save_pretrained(root / "tokenizer")
    CLIPTextModel(text).save_pretrained(root / "text_encoder")


def timed(fn, device, repeats: int) -> float:
    """Best time of ``repeats`` runs after one warm-up: wall time with CUDA synchronised, or this
    process's CPU time on the CPU (so that other jobs on a shared machine do not enter the ratios)."""
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    best = float("inf")
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = clock()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, clock() - start)
    return best


@torch.no_grad()
def main(args):
    device = torch.device(args.device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp), args.tiny)
        pipe = ka.from_pretrained(tmp, torch_dtype=dtype, device=device)
    prompt, cfg, steps, batch = "an astronaut riding a horse on mars", args.cfg, args.steps, args.batch
    shape = (batch, *pipe.latent_shape)
    emb = pipe.encode_cached([prompt] * batch + [""] * batch)["encoder_hidden_states"]
    x_net = torch.randn(shape, device=device, dtype=dtype).repeat(2, 1, 1, 1)
    t = torch.full((2 * batch,), 500.0, device=device)

    def floor():  # the network alone: `steps` UNet calls on the CFG batch
        for _ in range(steps):
            pipe.unet(x_net, t, encoder_hidden_states=emb, return_dict=False)

    condition = {"prompts": [prompt], "cfgs": [cfg]}
    x_T = pipe.get_init_latent(batch, generator=torch.Generator(device).manual_seed(0))
    ours = lambda: pipe.odeint(x_T, condition, steps, method="euler", disable=True)  # noqa: E731

    scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    reference = diffusers.StableDiffusionPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                                  unet=pipe.unet, scheduler=scheduler, safety_checker=None,
                                                  feature_extractor=None, requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    latents = torch.randn(shape, device=device, dtype=dtype)
    theirs = lambda: reference([prompt] * batch, num_inference_steps=steps, guidance_scale=cfg,  # noqa: E731
                               latents=latents, output_type="latent")

    times = {name: float("inf") for name in ("floor", "ours", "diffusers")}
    for _ in range(args.rounds):  # interleave so that clock/thermal drift hits all three alike
        for name, fn in (("floor", floor), ("ours", ours), ("diffusers", theirs)):
            times[name] = min(times[name], timed(fn, device, args.repeats))
    for b in (1, 8):
        xb, tb, eb = x_net[:1].repeat(b, 1, 1, 1), t[:1].repeat(b), emb[:1].repeat(b, 1, 1)
        ms = timed(lambda: pipe.unet(xb, tb, encoder_hidden_states=eb, return_dict=False), device, 5 * args.repeats)
        print(f"UNet alone, batch {b}: {1e3 * ms:.1f} ms")
    kind = "tiny" if args.tiny else "SD-1.5 (random weights)"
    print(f"{kind}, {args.dtype}, {device}, batch {batch}, {steps} steps, CFG {cfg}")
    for name, seconds in times.items():
        print(f"  {name:10s} {seconds / batch:.4f} s/image")
    print(f"ours / floor:      {times['ours'] / times['floor']:.4f}   (target <= 1.02)")
    print(f"diffusers / floor: {times['diffusers'] / times['floor']:.4f}")
    print(f"ours / diffusers:  {times['ours'] / times['diffusers']:.4f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny random model (for a CPU check of the script)")
    parser.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default=None,
                        help="network dtype (default fp16 on CUDA, fp32 on CPU)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--cfg", type=float, default=7.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("CUDA is not available; use --device cpu --tiny to check the script on the CPU")
    args.dtype = args.dtype or ("fp16" if args.device.startswith("cuda") else "fp32")
    if args.device == "cpu":
        torch.set_num_threads(1 if args.tiny else 2)  # tiny ops gain nothing from intra-op threads
    main(args)
