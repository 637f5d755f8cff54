"""tokenizer/factor_report.py and the pure metrics under it (tokenizer/factor_metrics.py)."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from demo.photos import build_photo_folder
from helpers import torchrun
from tiny import tiny_tokenizer_config
from tokenizer.factor_metrics import codebook_stats, cv_plan, separability, tsne
from tokenizer.factor_report import main, select_images
from tokenizer.models import FactorizedTokenizer, save_tokenizer

TOP_KEYS = {"vq_ckpt", "vq_weights", "model", "data_path", "image_size", "num_images", "classes", "class_counts",
            "num_classes", "codebook_size", "seed", "feature", "chance", "folds", "knn_k", "factors", "all_factors",
            "reconstructions", "files"}
SEPARABILITY_KEYS = {"name", "knn_accuracy", "probe_accuracy", "chance", "knn_k", "folds", "feature_dim"}
FACTOR_KEYS = SEPARABILITY_KEYS | {"codes_used", "usage", "perplexity"}


def planted(seed=0, classes=4, per_class=20, dim=8, spread=0.3):
    """Features that cluster by class: one random centre per class plus a little noise."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), per_class)
    return rng.normal(size=(classes, dim))[labels] * 3 + rng.normal(size=(len(labels), dim)) * spread, labels


def test_codebook_stats():
    assert codebook_stats(torch.tensor([2.0, 2, 0, 0])) == {"codes_used": 2, "usage": 0.5, "perplexity": 2.0}
    assert codebook_stats(torch.tensor([0.0, 7, 0, 0])) == {"codes_used": 1, "usage": 0.25, "perplexity": 1.0}
    s = codebook_stats(torch.tensor([1.0, 3]))  # exp of the entropy of (1/4, 3/4)
    assert s["perplexity"] == pytest.approx(np.exp(-(0.25 * np.log(0.25) + 0.75 * np.log(0.75))))


def test_cross_validation_adapts_to_class_sizes():
    assert cv_plan(np.repeat([0, 1], 30)) == (5, 5)  # the most folds and neighbours
    assert cv_plan(np.repeat([0, 1, 2], 4)) == (4, 3)  # one image of each class per fold; 3 left in training
    assert cv_plan(np.array([0, 0, 1, 1, 1, 1])) == (2, 1)
    r = separability(np.zeros((4, 2)), np.array([0, 1, 1, 1]))
    assert r["knn_accuracy"] is None and r["probe_accuracy"] is None and "two or more images" in r["note"]
    r = separability(np.random.default_rng(0).normal(size=(5, 2)), np.zeros(5, dtype=int))
    assert r["knn_accuracy"] is None and r["note"] == "needs two or more classes"


def test_planted_separability():
    x, y = planted()
    r = separability(x, y)
    assert r["chance"] == 0.25 and r["folds"] == 5 and r["knn_k"] == 5 and r["feature_dim"] == 8
    assert r["knn_accuracy"] >= 0.95 and r["probe_accuracy"] >= 0.95
    # the same features with the labels shuffled: nothing to learn, both are about chance
    shuffled = separability(x, np.random.default_rng(1).permutation(y))
    assert abs(shuffled["knn_accuracy"] - 0.25) < 0.15 and abs(shuffled["probe_accuracy"] - 0.25) < 0.15
    # labels need not be 0..C-1, and classes absent from the set do not lower the chance level
    assert separability(x, y * 3 + 7) == r


def test_tsne_is_reproducible_with_a_seed():
    x, _ = planted(per_class=8)
    a = tsne(x, seed=3)
    assert a.shape == (32, 2) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, tsne(x, seed=3))
    assert (tsne(np.ones((6, 4)), seed=0) == 0).all()  # identical features: no layout to find, no NaNs


def test_select_images_keeps_every_class():
    labels = np.repeat(np.arange(4), 10)  # an ImageFolder's order: sorted by class
    assert set(labels[select_images(40, 8)]) == {0, 1, 2, 3}
    assert len(select_images(40, 8)) == 8 and (select_images(40, 0) == np.arange(40)).all()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """12 photo crops in 3 classes, and tiny dual and triple tokenizers."""
    root = tmp_path_factory.mktemp("report")
    data = build_photo_folder(root / "data", per_class=4, size=40, classes=["astronaut", "cat", "rocket"])
    torch.manual_seed(0)
    for f in (2, 3):
        save_tokenizer(root / f"{f}.pt", FactorizedTokenizer(tiny_tokenizer_config(f)))
    return root, data


@pytest.mark.parametrize("num_factors", [2, 3])
def test_report_writes_every_field(folder, num_factors, capsys):
    root, data = folder
    out = root / f"out{num_factors}"
    report = main(["--vq-ckpt", str(root / f"{num_factors}.pt"), "--data-path", str(data), "--out", str(out),
                   "--image-size", "32", "--num-workers", "0", "--per-proc-batch-size", "5", "--num-show", "3"])
    assert json.loads((out / "report.json").read_text()) == report
    assert set(report) == TOP_KEYS
    names = ["vis", "sem"] if num_factors == 2 else ["vis", "sem_mid", "sem_high"]
    assert [f["name"] for f in report["factors"]] == names
    assert all(set(f) == FACTOR_KEYS for f in report["factors"]) and set(report["all_factors"]) == SEPARABILITY_KEYS
    assert report["num_images"] == 12 and report["class_counts"] == [4, 4, 4] and report["chance"] == pytest.approx(1 / 3)
    for f in report["factors"] + [report["all_factors"]]:
        assert 0 <= f["knn_accuracy"] <= 1 and 0 <= f["probe_accuracy"] <= 1 and f["folds"] == 4 and f["knn_k"] == 3
    for f in report["factors"]:
        assert 1 <= f["codes_used"] <= 64 and f["usage"] == f["codes_used"] / 64 and 1 <= f["perplexity"] <= 64
        assert f["feature_dim"] == 4
    assert report["all_factors"]["feature_dim"] == 4 * num_factors
    # reconstructions: one image per class, PSNR for the reconstruction, each factor alone and each swapped
    rec = report["reconstructions"]
    assert [r["class"] for r in rec] == ["astronaut", "cat", "rocket"]
    assert set(rec[0]["psnr"]) == {"reconstruction", *(f"only {n}" for n in names),
                                   *(f"{n} from next row" for n in names)}
    assert all(0 < v < 60 for r in rec for v in r["psnr"].values())
    w, h = Image.open(out / "tsne.png").size
    assert w > (num_factors + 1) * 300 and h > 300  # a panel per factor and one for all of them
    w, h = Image.open(out / "reconstructions.png").size
    assert w > (2 + 2 * num_factors) * 150 and h > 3 * 150
    printed = capsys.readouterr()
    assert "12 images, 3 classes, chance 33.3%" in printed.out and all(f"  {n} " in printed.out for n in names)
    assert "encoding" in printed.err  # the progress bar


def test_report_under_torchrun_matches_one_process(folder, tmp_path):
    root, data = folder
    odd = tmp_path / "odd"  # 11 images: the two ranks encode different numbers
    build_photo_folder(odd, per_class=4, size=40, classes=["astronaut", "cat", "rocket"])
    os.remove(odd / "cat" / "0003.png")
    args = ["--vq-ckpt", root / "2.pt", "--data-path", odd, "--image-size", 32, "--num-workers", 0,
            "--per-proc-batch-size", 2]
    r = torchrun("tokenizer/factor_report.py", *args, "--out", tmp_path / "two", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("11 images, 3 classes") == 1  # rank 0 alone reports
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    one = main([*map(str, args), "--out", str(tmp_path / "one")])
    assert two["class_counts"] == one["class_counts"] == [4, 3, 4]
    for a, b in zip(two["factors"] + [two["all_factors"]], one["factors"] + [one["all_factors"]]):
        assert a == pytest.approx(b)


def test_errors_name_the_flag(folder, tmp_path):
    root, _ = folder
    with pytest.raises(SystemExit, match="--data-path .*no such folder"):
        main(["--vq-ckpt", str(root / "2.pt"), "--data-path", str(tmp_path / "none"), "--out", str(tmp_path)])
