"""`make demo`: the whole FQGAN pipeline on one CPU in about a quarter of an hour, with no downloads.

1. builds a small class-labelled dataset from the photographs that ship with scikit-image;
2. trains a small dual FQGAN tokenizer (the project's real training loop, scaled down);
3. measures it on held-out crops: PSNR before and after training, codebook usage per factor, and draws a grid
   of originals, reconstructions and decodes with one factor's codes swapped between images; then the factor
   report (``tokenizer/factor_report.py``) of the untrained and the trained tokenizer: how well each factor's
   features tell the four classes apart (kNN and linear-probe accuracy), t-SNE per factor, usage;
4. extracts the training set's codes, trains a tiny FAR generator on them, and samples a grid per class.

Everything lands in one folder (default ``demo_output/``): checkpoints, ``reconstructions.png``,
``factor_report/{untrained,trained}/`` (``report.json``, ``tsne.png``, ``reconstructions.png``), ``samples.png``
(+ one per class), ``metrics.json``. ``--quick`` shrinks every step for a smoke test.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


import numpy as np
import torch

from demo.photos import build_photo_folder
from tokenizer.factor_report import main as factor_report
from tokenizer.models import FactorizedTokenizer, load_tokenizer, save_tokenizer, swap_factor
from utils.data import ImageFolderSafe, eval_transform
from utils.images import save_grid
from utils.rng import seed_everything

CLASSES = ["cat", "coffee", "hubble", "rocket"]  # clearly different colours; sorted, as ImageFolder labels them
IMAGE = 64
REPORT_PER_CLASS = 16  # held-out crops per class for the factor report (5-fold kNN / probe, a t-SNE of 64 points)
# A small VQ-8-like tokenizer: 64x64 images -> 8x8 codes per factor, 512-entry codebooks.
TOKENIZER_ARCH = ["--image-size", str(IMAGE), "--vq-model", "VQ-8", "--ch", "32", "--ch-mult", "1,2,2,2",
                  "--num-res-blocks", "1",
                  "--z-channels", "64", "--adapter-layers", "2", "--codebook-size", "512",
                  "--codebook-embed-dim", "8"]


def say(msg: str) -> None:
    print(f"\n==> {msg}", flush=True)


def psnr_and_codes(model: FactorizedTokenizer, x: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Mean per-image PSNR (dB, 8-bit range) of the reconstructions, the code indices and the reconstructions."""
    with torch.no_grad():
        idx = model.encode_indices(x)
        rec = model.decode_indices(idx).clamp(-1, 1)
    mse = ((rec - x) * 127.5).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(255.0 ** 2 / mse)).mean()), idx, rec


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_output")
    p.add_argument("--steps", type=int, default=420, help="tokenizer training steps")
    p.add_argument("--far-steps", type=int, default=300, help="generator training steps")
    p.add_argument("--per-class", type=int, default=48, help="training crops per class")
    p.add_argument("--quick", action="store_true", help="a few steps of everything (smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.far_steps, args.per_class = 4, 4, 4
    out = Path(args.out)
    t0 = time.time()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    say(f"1/4 dataset: {len(CLASSES)} classes ({', '.join(CLASSES)}) of crops of scikit-image's photographs")
    train_dir = build_photo_folder(out / "data" / "train", args.per_class, IMAGE + IMAGE // 4, CLASSES, seed=0)
    val_dir = build_photo_folder(out / "data" / "val", 4, IMAGE, CLASSES, seed=1)
    report_per_class = 4 if args.quick else REPORT_PER_CLASS
    report_dir = build_photo_folder(out / "data" / "report", report_per_class, IMAGE, CLASSES, seed=2)
    print(f"    {len(CLASSES) * args.per_class} training crops in {train_dir}, {4 * len(CLASSES)} held-out in {val_dir}, "
          f"{report_per_class * len(CLASSES)} held-out for the factor report in {report_dir}")

    say(f"2/4 tokenizer: a small dual FQGAN (visual + semantic codebooks), {args.steps} steps")
    print("    LPIPS is off: it needs torchvision's VGG16 weights (vgg16-397923af.pth in the torch hub cache, or "
          "--vgg-path); with them, add --perceptual-weight 1.")
    print("    Semantic supervision is off: it needs CLIP ViT-L/14 offline (--with_clip_supervision, and "
          "--teacher-sem DIR for a local copy).")
    print("    The GAN is off here too (--disc-start beyond the run); the full recipe is train_fqgan_dual.sh.")
    from tokenizer.train import main as train_tokenizer

    tok_dir = out / "tokenizer"
    ckpt = train_tokenizer(["--data-path", str(train_dir), *TOKENIZER_ARCH, "--results-dir", str(tok_dir),
                            "--exp-name", "demo", "--global-batch-size", "8", "--lr", "5e-4",
                            "--entropy-loss-ratio", "0.03", "--with_disentanglement", "--perceptual-weight", "0",
                            "--disc-start", str(10 ** 9), "--epochs", "1000", "--max-steps", str(args.steps),
                            "--log-every", str(max(1, args.steps // 10)), "--ckpt-every", str(args.steps),
                            "--image-every", str(args.steps), "--num-workers", "0"], preset="dual")

    say("3/4 evaluation on held-out crops")
    model = load_tokenizer(ckpt)
    seed_everything(0)
    untrained = FactorizedTokenizer(model.config).eval()
    val = ImageFolderSafe(val_dir, eval_transform(IMAGE), IMAGE)
    x = torch.stack([val[i][0] for i in range(len(val))])
    psnr_init, _, _ = psnr_and_codes(untrained, x)
    psnr_trained, idx, rec = psnr_and_codes(model, x)
    usage = {name: float(len(torch.unique(idx[:, f]))) / model.config.codebook_size
             for f, name in enumerate(model.factor_names)}
    # Grid rows: originals, reconstructions, then each factor swapped with the next image's.
    show = slice(0, len(x), max(1, len(x) // 8))
    partner = torch.roll(idx, shifts=-4, dims=0)  # the same position in the next class
    rows = [x[show], rec[show]]
    with torch.no_grad():
        for f in range(len(model.factor_names)):
            rows.append(model.decode_indices(swap_factor(idx, partner, f))[show])
    save_grid(torch.cat(rows), out / "reconstructions.png", nrow=len(x[show]))
    print(f"    PSNR {psnr_init:.2f} dB untrained -> {psnr_trained:.2f} dB trained; codebook usage "
          + ", ".join(f"{k} {v:.1%}" for k, v in usage.items()))
    print(f"    {out / 'reconstructions.png'}: originals | reconstructions | "
          + " | ".join(f"{n} codes from the next class's image" for n in model.factor_names))
    metrics = {"psnr_init": psnr_init, "psnr_trained": psnr_trained, "codebook_usage": usage,
               "tokenizer_steps": args.steps, "tokenizer_checkpoint": str(ckpt), "held_out_images": len(x)}

    print("    factor report: what each factor's features say about the class, before and after training")
    untrained_ckpt = tok_dir / "untrained.pt"
    save_tokenizer(untrained_ckpt, untrained)
    reports = {}
    for name, path in (("untrained", untrained_ckpt), ("trained", ckpt)):
        print(f"    --- {name} tokenizer")
        reports[name] = factor_report(["--vq-ckpt", str(path), "--data-path", str(report_dir), "--image-size",
                                       str(IMAGE), "--out", str(out / "factor_report" / name), "--num-workers", "0"])
    metrics["factor_report"] = {name: {r["name"]: {k: r[k] for k in ("knn_accuracy", "probe_accuracy")}
                                       for r in rep["factors"] + [rep["all_factors"]]}
                                for name, rep in reports.items()}
    metrics["factor_report"]["chance"] = reports["trained"]["chance"]
    print(f"    class separability (chance {reports['trained']['chance']:.0%}), untrained -> trained:")
    before, after = metrics["factor_report"]["untrained"], metrics["factor_report"]["trained"]
    for factor in after:
        print(f"      {factor:<4} kNN {before[factor]['knn_accuracy']:.0%} -> {after[factor]['knn_accuracy']:.0%}, "
              f"linear probe {before[factor]['probe_accuracy']:.0%} -> {after[factor]['probe_accuracy']:.0%}")
    print(f"    {out / 'factor_report'}/{{untrained,trained}}/: report.json, tsne.png, reconstructions.png")

    say(f"4/4 generator: codes of the training set, a tiny FAR for {args.far_steps} steps, samples per class")
    from autoregressive.sample.sample_c2i import main as sample
    from autoregressive.train.extract_codes import main as extract
    from autoregressive.train.train_c2i import main as train_far

    codes = out / "codes"
    extract(["--vq-ckpt", str(ckpt), "--data-path", str(train_dir), "--code-path", str(codes),
             "--image-size", str(IMAGE), "--num-workers", "0"], num_factors=2)
    far_ckpt = train_far(["--code-path", str(codes), "--gpt-model", "FAR-T", "--vocab-size", "512",
                          "--image-size", str(IMAGE), "--downsample-size", "8", "--num-classes", str(len(CLASSES)),
                          "--global-batch-size", str(min(24, args.per_class * len(CLASSES))), "--lr", "1e-3",
                          "--epochs", "100000", "--max-steps", str(args.far_steps), "--log-every", str(max(1, args.far_steps // 8)), "--ckpt-every",
                          str(args.far_steps), "--results-dir", str(out / "far"), "--exp-name", "demo",
                          "--num-workers", "0"], num_factors=2)
    per_class = 8
    npz = sample(["--vq-ckpt", str(ckpt), "--gpt-ckpt", str(far_ckpt), "--gpt-model", "FAR-T",
                  "--image-size", str(IMAGE), "--image-size-eval", str(IMAGE), "--downsample-size", "8",
                  "--num-classes", str(len(CLASSES)), "--cfg-scale", "2.0", "--top-k", "64",
                  "--num-fid-samples", str(per_class * len(CLASSES)), "--per-proc-batch-size", str(per_class),
                  "--class-balanced", "--sample-dir", str(out), "--name", "samples", "--grid-samples", "0",
                  "--overwrite"],
                 num_factors=2)
    data = np.load(npz)
    images, labels = torch.from_numpy(data["arr_0"]), data["arr_1"]
    as_model = images.permute(0, 3, 1, 2).float() / 127.5 - 1
    rows = []
    for c, name in enumerate(CLASSES):
        mine = as_model[labels == c]
        save_grid(mine, out / f"samples_{name}.png", nrow=per_class)
        rows.append(mine)
    save_grid(torch.cat(rows), out / "samples.png", nrow=per_class)
    print(f"    {out / 'samples.png'}: one row per class ({', '.join(CLASSES)}), {per_class} samples each")
    metrics.update({"far_steps": args.far_steps, "far_checkpoint": str(far_ckpt), "samples": str(npz),
                    "seconds": round(time.time() - t0, 1)})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    say(f"done in {metrics['seconds']:.0f} s: PSNR {psnr_init:.2f} -> {psnr_trained:.2f} dB; "
        f"everything is in {out}/ (metrics.json, reconstructions.png, samples.png)")
    return metrics


if __name__ == "__main__":
    main()
