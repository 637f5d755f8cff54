"""What has each sub-codebook learned? A report on a tokenizer's factors over a class-labelled image set.

    python tokenizer/factor_report.py --vq-ckpt fqgan_dual_ds16.pt --data-path DIR --out OUT [--num-images N]
    torchrun --nproc_per_node=8 tokenizer/factor_report.py ...   # the ranks share the encoding

DIR is an ImageFolder (one folder per class, e.g. ten classes of ImageNet val); --vq-ckpt a file or an hf://
name. Each image (ADM centre crop) is encoded once; its feature for a factor is that factor's quantized codes
averaged over positions. OUT receives:

* ``report.json``: per factor, and for the concatenation of all factors, the codes used over the set, codebook
  usage and perplexity, and class separability: cross-validated k-nearest-neighbour accuracy and a linear
  probe's accuracy, with chance level beside them (``tokenizer/factor_metrics.py``);
* ``tsne.png``: one t-SNE panel per factor (and one for all factors together), coloured by class; --seed fixes it;
* ``reconstructions.png``: for one image of each of a few classes, the input, the full reconstruction, each
  factor decoded alone (the other factors' codes zeroed) and each factor swapped with the next row's image,
  with the PSNR against the input under each.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from tokenizer.factor_metrics import codebook_stats, separability, tsne
from tokenizer.models import check_tokenizer_flags, describe_tokenizer, load_tokenizer, swap_factor
from tokenizer.reconstruct_image import psnr
from utils.argtypes import nonnegative_int, positive_int
from utils.checkpoint import CheckpointError, unsafe_load_flag
from utils.data import UnreadableImage, eval_batches, eval_transform, image_dataset, rank_shard
from utils.distributed import all_gather_objects, all_reduce_sum, cleanup, init_distributed
from utils.flags import exits_on, flag, parse

MAX_LEGEND = 20  # classes named in the t-SNE legend; beyond that the colours alone tell them apart


@dataclass(frozen=True)
class ReportConfig:
    """The command line of the factor report."""
    vq_ckpt: str = flag("", required=True, help="tokenizer checkpoint: a file or hf://owner/repo/file")
    data_path: str = flag("", required=True, help="an ImageFolder (a sub-folder of images per class) or its tar shards")
    out: str = flag("", required=True, help="folder for report.json, tsne.png and reconstructions.png")
    num_images: int = flag(0, type=nonnegative_int,
                           help="use N images spread evenly over the set, so every class keeps its share (0: all)")
    image_size: int = flag(256, type=positive_int)
    num_show: int = flag(4, type=positive_int, help="images (one per class) in reconstructions.png")
    seed: int = flag(0, type=int, help="seeds the t-SNE and the cross-validation folds")
    per_proc_batch_size: int = flag(32, type=positive_int)
    num_workers: int = flag(4, type=nonnegative_int)
    unsafe_load: bool = unsafe_load_flag()


def select_images(n: int, num_images: int) -> np.ndarray:
    """Indices of ``num_images`` of a set of ``n`` spread evenly over it. An ImageFolder is sorted by class,
    so the first N images would cover only the first classes; an even spread keeps each class's share."""
    if not num_images or num_images >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, num_images).round().astype(np.int64))


@torch.no_grad()
def encode_set(model, dataset, indices: np.ndarray, batch_size: int, num_workers: int, device, show_bar: bool):
    """Encode ``indices`` of ``dataset``: (dataset indices, labels, features (n, F, D), code histograms (F, K)).
    A feature is one factor's quantized codes averaged over positions."""
    cfg = model.config
    hist = torch.zeros(cfg.num_factors, cfg.codebook_size, dtype=torch.float64, device=device)
    ids, labels, feats = [], [], []
    total = -(-len(indices) // batch_size)
    for x, y, idx, _ in tqdm(eval_batches(dataset, indices, batch_size, num_workers), total=total,
                             disable=not show_bar, desc="encoding"):
        qs = model.quantize(x.to(device, non_blocking=True))
        feats.append(torch.stack([q.quant.mean(dim=(2, 3)) for q in qs], dim=1).cpu())
        for f, q in enumerate(qs):
            hist[f] += torch.bincount(q.indices.flatten(), minlength=cfg.codebook_size).double()
        ids.append(idx)
        labels.append(y)
    if not ids:  # a rank with no images (more ranks than images)
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, cfg.num_factors, cfg.codebook_embed_dim),
                                                                      np.float32), hist
    return torch.cat(ids).numpy(), torch.cat(labels).numpy(), torch.cat(feats).numpy(), hist


def factor_table(names: list[str], feats: np.ndarray, labels: np.ndarray, hist: torch.Tensor,
                 seed: int) -> tuple[list[dict], dict]:
    """Usage and separability of each factor, and separability of all factors' features concatenated."""
    rows = [{"name": name, **codebook_stats(hist[f].cpu()), **separability(feats[:, f], labels, seed)}
            for f, name in enumerate(names)]
    return rows, {"name": "all", **separability(feats.reshape(len(feats), -1), labels, seed)}


def show_indices(labels: np.ndarray, num_show: int) -> list[int]:
    """Positions of up to ``num_show`` images: the first of each class, then further ones if classes run out."""
    first = [int(np.flatnonzero(labels == c)[0]) for c in np.unique(labels)][:num_show]
    rest = [i for i in range(len(labels)) if i not in first]
    return first + rest[:num_show - len(first)]


@torch.no_grad()
def reconstruction_panels(model, x: torch.Tensor) -> tuple[list[str], list[torch.Tensor]]:
    """Column titles and images (n, 3, H, W) per column: input, reconstruction, each factor alone, each factor
    swapped with the next row's image (the last row takes the first row's)."""
    idx = model.encode_indices(x)
    partner = torch.roll(idx, shifts=-1, dims=0)
    names = model.factor_names
    cols = [("input", x), ("reconstruction", model.decode_indices(idx))]
    cols += [(f"only {n}", model.decode_indices(idx, keep=[f])) for f, n in enumerate(names)]
    cols += [(f"{n} from next row", model.decode_indices(swap_factor(idx, partner, f))) for f, n in enumerate(names)]
    return [c[0] for c in cols], [c[1].clamp(-1, 1) for c in cols]


def draw_reconstructions(titles: list[str], columns: list[torch.Tensor], row_names: list[str], path: Path) -> list:
    """A grid, one row per image, one column per panel, PSNR against the input under each; returns the PSNRs."""
    from matplotlib.figure import Figure

    rows, cols = len(columns[0]), len(columns)
    fig = Figure(figsize=(1.9 * cols, 2.1 * rows + 0.3))
    table = []
    for r in range(rows):
        table.append({})
        for c, (title, images) in enumerate(zip(titles, columns)):
            ax = fig.add_subplot(rows, cols, r * cols + c + 1)
            ax.imshow(((images[r].permute(1, 2, 0).cpu().numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=9)
            if c == 0:
                ax.set_ylabel(row_names[r], fontsize=9)
            else:
                table[r][title] = psnr(images[r:r + 1], columns[0][r:r + 1])
                ax.set_xlabel(f"{table[r][title]:.1f} dB", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return table


def draw_tsne(points: list[np.ndarray], titles: list[str], labels: np.ndarray, classes: list[str], path: Path) -> None:
    """One scatter panel per embedding (N, 2), points coloured by class, one shared legend."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    present = np.unique(labels)
    cmap = colormaps["tab10" if len(present) <= 10 else "tab20" if len(present) <= 20 else "turbo"]
    colour = {c: cmap(i / max(1, len(present) - 1) if len(present) > 20 else i) for i, c in enumerate(present)}
    fig = Figure(figsize=(4.2 * len(points) + (1.8 if len(present) <= MAX_LEGEND else 0), 4.4))
    axes = fig.subplots(1, len(points), squeeze=False)[0]
    for ax, xy, title in zip(axes, points, titles):
        for c in present:
            mine = labels == c
            ax.scatter(xy[mine, 0], xy[mine, 1], s=22, color=colour[c], label=classes[c], alpha=0.85, linewidths=0)
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    if len(present) <= MAX_LEGEND:
        fig.legend(*axes[0].get_legend_handles_labels(), loc="center right", fontsize=9, markerscale=1.5,
                   frameon=False)
        fig.tight_layout(rect=(0, 0, 1 - 1.8 / fig.get_figwidth(), 1))
    else:
        fig.tight_layout()
    fig.savefig(path, dpi=100)


def percent(v) -> str:
    return "   -  " if v is None else f"{100 * v:5.1f}%"


def summary(report: dict) -> str:
    """The one-screen table printed at the end."""
    lines = [f"{report['model']}: {report['num_images']} images, {report['num_classes']} classes, chance "
             f"{100 * report['chance']:.1f}%; kNN (k={report['knn_k']}) and linear probe accuracies over "
             f"{report['folds']} folds",
             f"  {'factor':<10} {'codes used':>12} {'perplexity':>10} {'kNN':>7} {'probe':>7}"]
    for r in report["factors"] + [report["all_factors"]]:
        used = f"{r['codes_used']}/{report['codebook_size']}" if "codes_used" in r else ""
        ppl = f"{r['perplexity']:.1f}" if "perplexity" in r else ""
        lines.append(f"  {r['name']:<10} {used:>12} {ppl:>10} {percent(r['knn_accuracy']):>7} "
                     f"{percent(r['probe_accuracy']):>7}")
    if report["all_factors"].get("note"):
        lines.append(f"  (no separability: {report['all_factors']['note']})")
    lines.append(f"  wrote {report['files']['json']}, {report['files']['tsne']}, {report['files']['reconstructions']}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    cfg = parse(ReportConfig, argv, __doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    with exits_on(UnreadableImage):
        return factor_report(cfg)


def factor_report(args: ReportConfig) -> dict:
    """Encode the set, compute the report and write its files (rank 0); every rank returns the report."""
    info = init_distributed()
    try:
        model = load_tokenizer(args.vq_ckpt, map_location="cpu")
        check_tokenizer_flags(args, model)
        dataset = image_dataset(args.data_path, eval_transform(args.image_size), args.image_size)
    except (CheckpointError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    model = model.to(info.device).eval()
    cfg = model.config
    selected = select_images(len(dataset), args.num_images)
    mine = selected[rank_shard(len(selected), info.rank, info.world_size)]
    ids, labels, feats, hist = encode_set(model, dataset, mine, args.per_proc_batch_size, args.num_workers,
                                          info.device, info.is_main)
    all_reduce_sum(hist)
    parts = all_gather_objects((ids, labels, feats))
    report = None
    if info.is_main:
        order = np.argsort(np.concatenate([p[0] for p in parts]), kind="stable")
        ids, labels, feats = (np.concatenate([p[i] for p in parts])[order] for i in range(3))
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        factors, together = factor_table(model.factor_names, feats, labels, hist, args.seed)
        panels = [tsne(feats[:, f], args.seed) for f in range(cfg.num_factors)]
        panels.append(tsne(feats.reshape(len(feats), -1), args.seed))
        draw_tsne(panels, [f"{r['name']}: kNN {percent(r['knn_accuracy']).strip()}, probe "
                           f"{percent(r['probe_accuracy']).strip()}" for r in factors + [together]],
                  labels, dataset.classes, out / "tsne.png")
        show = show_indices(labels, args.num_show)
        x = torch.stack([dataset[int(ids[i])][0] for i in show]).to(info.device)
        titles, columns = reconstruction_panels(model, x)
        row_names = [f"{dataset.classes[labels[i]]} #{ids[i]}" for i in show]
        psnrs = draw_reconstructions(titles, columns, row_names, out / "reconstructions.png")
        counts = np.bincount(labels, minlength=len(dataset.classes))
        report = {"vq_ckpt": str(args.vq_ckpt), "vq_weights": model.loaded_from.weights,
                  "model": describe_tokenizer(cfg), "data_path": str(args.data_path), "image_size": args.image_size,
                  "num_images": len(labels), "classes": dataset.classes, "class_counts": counts.tolist(),
                  "num_classes": int((counts > 0).sum()), "codebook_size": cfg.codebook_size, "seed": args.seed,
                  "feature": "each image's quantized codes of the factor, averaged over positions; standardized",
                  "chance": together["chance"], "folds": together["folds"], "knn_k": together["knn_k"],
                  "factors": factors, "all_factors": together,
                  "reconstructions": [{"image": int(ids[i]), "class": dataset.classes[labels[i]], "psnr": p}
                                      for i, p in zip(show, psnrs)],
                  "files": {"json": str(out / "report.json"), "tsne": str(out / "tsne.png"),
                            "reconstructions": str(out / "reconstructions.png")}}
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        print(summary(report))
    cleanup()
    return report


if __name__ == "__main__":
    main()
