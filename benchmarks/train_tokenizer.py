"""One full tokenizer training step, as tokenizer/train.py runs it; prints ONE JSON line.

    python benchmarks/train_tokenizer.py                      # VQ-16 dual, batch 2, 256x256
    python benchmarks/train_tokenizer.py --device cpu --iters 2

A step is the generator update (forward, LPIPS, quantizer/disentanglement losses, GAN generator loss through
the PatchGAN, backward, clipping, Adam) plus the discriminator update. LPIPS uses the real VGG16 weights when
they are in the torch hub cache, else random ones (same cost); semantic teachers are used only when present
offline (--teachers). Random images; speed does not depend on content.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.tokenizer import _peak_memory_gb, _sync, autocast_for  # noqa: E402
from tokenizer.losses import LPIPS, FQGANLoss, LossConfig, MissingWeightsError, build_discriminator  # noqa: E402
from tokenizer.models import FactorizedTokenizer, tokenizer_config  # noqa: E402
from utils.steps import frozen  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="dual", choices=["dual", "triple"])
    p.add_argument("--vq-model", default="VQ-16", choices=["VQ-16", "VQ-8"])
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--teachers", action="store_true", help="load the preset's teachers (must be available offline)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    amp, dtype_name = autocast_for(device, args.dtype)
    torch.manual_seed(0)
    cfg = tokenizer_config(args.preset, args.vq_model, entropy_loss_ratio=0.03, disentanglement_ratio=0.1,
                           with_feature_heads=args.teachers)
    model = FactorizedTokenizer(cfg).to(device).train()
    try:
        lpips, vgg = LPIPS(), "imagenet"
    except MissingWeightsError:
        lpips, vgg = LPIPS(pretrained=False), "random"
    loss_fn = FQGANLoss(LossConfig(disc_start=0), model.factor_names, perceptual=lpips).to(device).train()
    teachers = None
    if args.teachers:
        from tokenizer.teachers import load_teachers
        teachers = load_teachers(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    disc = build_discriminator().to(device).train()
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-4, betas=(0.9, 0.95))
    x = torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=device) * 2 - 1

    def step():
        with amp():
            out = model(x)
            cls = teachers(x) if teachers is not None else None
            with frozen(disc):
                gl = loss_fn.generator_step(x, out, step=1, teacher_cls=cls, discriminator=disc)
        gl.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with amp():
            dl = loss_fn.discriminator_step(disc, x, out.recon.detach(), step=1)
        dl.loss.backward()
        opt_d.step()
        opt_d.zero_grad(set_to_none=True)

    step()  # warm-up (allocations, cuDNN autotuning)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    for _ in range(args.iters):
        step()
    _sync(device)
    sec = (time.perf_counter() - t) / args.iters
    result = {"benchmark": "train_tokenizer", "preset": args.preset, "vq_model": args.vq_model,
              "batch_size": args.batch_size, "image_size": args.image_size,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "dtype": dtype_name, "lpips_vgg": vgg,
              "teachers": bool(args.teachers), "seconds_per_step": round(sec, 4), "steps_per_s": round(1 / sec, 4),
              "images_per_s": round(args.batch_size / sec, 3), "peak_memory_gb": round(_peak_memory_gb(device), 3),
              "torch": torch.__version__}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
