"""WebDataset tar shards: the converter's round trip and resume, every form of --data-path, one epoch reading each
image once for any world size and worker count, and the one-line messages of bad shards and members.
(Training resumed after SIGTERM on shards: test_tokenizer_training.py; the reference batch and reconstructions
of shards: test_reconstruction_eval.py.)"""
import io
import os
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from utils import shards
from utils.data import (ImageFolderSafe, ResumableSampler, UnreadableImage, epoch_loader, eval_batches,
                        eval_transform, image_dataset, train_transform)
from utils.images import open_rgb
from utils.shards import ShardError

pytestmark = pytest.mark.usefixtures("private_cache")  # shard indices are cached under $XDG_CACHE_HOME


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """240 tiny images (16x16, PNG and JPEG) in 3 classes."""
    root = tmp_path_factory.mktemp("tiny") / "tiny"
    rng = np.random.default_rng(0)
    for c in ("ant", "bee", "cat"):
        (root / c).mkdir(parents=True)
        for i in range(80):
            arr = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{c}_{i:03d}.{'png' if i % 3 else 'JPEG'}")
    return root


@pytest.fixture(scope="module")
def sharded(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    shards.main(["--data-path", str(folder), "--out", str(out), "--max-count", "50"])
    return out


def members(tar_path):
    with tarfile.open(tar_path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def test_converter_round_trip_is_bit_identical(folder, sharded):
    samples, classes = ImageFolderSafe(folder, eval_transform(16), 16).samples, ["ant", "bee", "cat"]
    assert shards.json.loads((sharded / "classes.json").read_text()) == classes
    tars = sorted(sharded.glob("*.tar"))
    assert [t.name for t in tars] == [f"tiny-{i:06d}.tar" for i in range(5)]
    got = [m for t in tars for m in members(t)]
    assert len(got) == 2 * len(samples)
    for (path, label), (image, data), (cls, text) in zip(samples, got[0::2], got[1::2]):
        rel = os.path.relpath(path, folder)
        ext = "jpg" if rel.endswith(".JPEG") else "png"
        assert image == f"{rel.rsplit('.', 1)[0]}.{ext}" and cls == f"{rel.rsplit('.', 1)[0]}.cls"
        assert data == Path(path).read_bytes() and text == str(label).encode()  # the file's own bytes
    ds = image_dataset(sharded, eval_transform(16), 16)
    assert len(ds) == 240 and ds.classes == classes
    for i in (0, 1, 50, 239):  # decoded as the folder decodes the same file
        assert np.array_equal(np.asarray(ds.read(i)), np.asarray(open_rgb(samples[i][0])))
        assert ds.key(i) == ImageFolderSafe(folder, eval_transform(16), 16).key(i) and ds.label(i) == samples[i][1]


def test_killed_conversion_resumes_and_never_leaves_half_a_shard(folder, sharded, tmp_path, monkeypatch):
    from utils.checkpoint import atomic_write

    real, written = shards._write_shard, []

    def killed_in_the_third(path, items):
        if len(written) == 2:
            def half(f):
                f.write(b"\0" * 4096)
                raise KeyboardInterrupt  # the kill, mid-write
            atomic_write(path, half, 1 << 16)
        written.append(path.name)
        return real(path, items)

    monkeypatch.setattr(shards, "_write_shard", killed_in_the_third)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        shards.convert(folder, out, max_count=50, log=lambda *a: None)
    assert sorted(p.name for p in out.iterdir()) == [".tiny.lock", "classes.json", "tiny-000000.tar",
                                                     "tiny-000001.tar", "tiny.json"]
    (out / ".tiny-000002.tar.x1y2.tmp").write_bytes(b"left by kill -9")
    first = (out / "tiny-000000.tar").stat().st_mtime_ns
    with pytest.raises(ShardError, match=r"tiny.json: made with --max-count 50 --max-size 1073741824; rerun with "
                                         r"those, or choose another --out or --prefix$"):
        shards.convert(folder, out, max_count=40)
    monkeypatch.setattr(shards, "_write_shard", real)
    manifest = shards.convert(folder, out, max_count=50, log=lambda *a: None)
    assert manifest["complete"] and [s["images"] for s in manifest["shards"]] == [50, 50, 50, 50, 40]
    assert (out / "tiny-000000.tar").stat().st_mtime_ns == first  # finished shards are kept, not rewritten
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in sharded.iterdir())  # no temporaries
    for t in sorted(sharded.glob("*.tar")):
        assert (out / t.name).read_bytes() == t.read_bytes()  # as an uninterrupted conversion writes them


def test_max_size_bounds_every_shard(folder, tmp_path):
    manifest = shards.main(["--data-path", str(folder), "--out", str(tmp_path), "--max-size", "20K",
                            "--prefix", "small"])
    sizes = [(tmp_path / s["name"]).stat().st_size for s in manifest["shards"]]
    assert sizes == [s["bytes"] for s in manifest["shards"]] and max(sizes) <= 20 << 10
    assert sum(s["images"] for s in manifest["shards"]) == 240 and len(sizes) > 5
    assert len(image_dataset(tmp_path, eval_transform(16), 16)) == 240


def test_keys_are_unique_and_split_where_webdataset_splits(tmp_path):
    from utils.data import sample_key

    for name in ("a.b.png", "a_b.png", "a_b.jpeg"):
        (tmp_path / "in" / "x").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4), (len(name), 0, 0)).save(tmp_path / "in" / "x" / name, format="PNG")
    assert sample_key("x/a.b.png") == "x/a_b" and sample_key("a.b.png") == "a_b"
    shards.convert(tmp_path / "in", tmp_path / "out", log=lambda *a: None)
    assert [n for n, _ in members(tmp_path / "out" / "in-000000.tar")] == [  # listing order: a.b, a_b.jpeg, a_b.png
        "x/a_b.png", "x/a_b.cls", "x/a_b_1.jpg", "x/a_b_1.cls", "x/a_b_2.png", "x/a_b_2.cls"]
    ds = image_dataset(tmp_path / "out", eval_transform(4), 4)
    assert [ds.key(i) for i in range(3)] == ["x/a_b", "x/a_b_1", "x/a_b_2"]
    assert [np.asarray(ds.read(i))[0, 0, 0] for i in range(3)] == [7, 8, 7]


def test_every_form_of_data_path(sharded, tmp_path):
    assert shards.expand_braces("a-{08..10}-{x,y}.tar") == ["a-08-x.tar", "a-08-y.tar", "a-09-x.tar", "a-09-y.tar",
                                                            "a-10-x.tar", "a-10-y.tar"]
    tars = sorted(sharded.glob("*.tar"))
    listing = tmp_path / "train.txt"
    listing.write_text(f"# the first three\n{sharded}/tiny-{{000000..000002}}.tar\n\n"
                       f"{os.path.relpath(tars[4], tmp_path)}\n")  # relative to the list's folder
    assert [p.resolve() for p in shards.shard_paths(listing)] == tars[:3] + [tars[4]]
    assert shards.shard_paths(f"{sharded}/tiny-{{000000..000004}}.tar") == tars == shards.shard_paths(sharded)
    assert shards.shard_paths(tars[1]) == [tars[1]]
    assert shards.shard_paths(tmp_path / "nowhere") is None  # an image folder's own "no such folder" follows
    pattern = f"{sharded}/tiny-{{000000..000005}}.tar"
    with pytest.raises(ShardError) as e:
        shards.shard_paths(pattern)
    assert str(e.value) == f"--data-path {pattern}: shard {sharded}/tiny-000005.tar does not exist"
    assert len(image_dataset(listing, eval_transform(16), 16)) == 190


def test_the_index_is_cached_per_shard_version(sharded, tmp_path, monkeypatch):
    image_dataset(sharded, eval_transform(16), 16)
    scanned = []
    real = shards.scan_shard
    monkeypatch.setattr(shards, "scan_shard", lambda p: scanned.append(p.name) or real(p))
    assert len(image_dataset(sharded, eval_transform(16), 16)) == 240 and scanned == []  # all from the cache
    copy = tmp_path / "tiny-000003.tar"
    copy.write_bytes((sharded / "tiny-000003.tar").read_bytes())
    image_dataset(copy, eval_transform(16), 16)
    os.utime(copy, ns=(0, 0))  # another version of the file at the same path
    image_dataset(copy, eval_transform(16), 16)
    assert scanned == ["tiny-000003.tar"] * 2


@pytest.mark.parametrize("world", [1, 2])
def test_one_epoch_reads_every_image_once_as_the_folder_does(folder, sharded, world):
    """The (key, label, pixels) of one epoch, over every rank, after the training transform (decode + ADM random
    crop + flip), with 0 and 2 loader workers: the same multiset as the folder's, each image once."""
    def epoch(ds, workers):
        seen = []
        for rank in range(world):
            sampler = ResumableSampler(len(ds), 8, rank, world, seed=3)
            sampler.set_epoch(1)
            ds.set_epoch(1)
            loader = epoch_loader(ds, sampler, 8, workers, lambda b: b, torch.device("cpu"), seed=3)
            seen += [(ds.key(i), y, x.numpy().tobytes()) for batch in loader for x, y, i, _ in batch]
        return seen

    reference = Counter(epoch(ImageFolderSafe(folder, train_transform(12), 12, seed=3, fallback=True), 0))
    assert len(reference) == 240 and set(reference.values()) == {1}
    ds = image_dataset(f"{sharded}/tiny-{{000000..000004}}.tar", train_transform(12), 12, seed=3, fallback=True)
    for workers in (0, 2):
        assert Counter(epoch(ds, workers)) == reference
    assert ds._files and not ds.__getstate__()["_files"]  # a spawned worker opens its own descriptors


def write_tar(path, entries):
    with tarfile.open(path, "w") as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def one_line(path):
    with pytest.raises(ShardError) as e:
        image_dataset(path, eval_transform(16), 16)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bad_shards_and_members_each_give_one_line(folder, sharded, tmp_path):
    png = next(folder.glob("ant/*.png")).read_bytes()
    good = sharded / "tiny-000000.tar"
    data = good.read_bytes()
    with tarfile.open(good) as tar:
        third = tar.getmembers()[2]  # ant/ant_001.png
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "text.tar").write_bytes(b"not a tar " * 100)
    assert one_line(bad / "text.tar") == f"{bad}/text.tar: not a tar file (invalid header)"
    (bad / "cut.tar").write_bytes(data[:third.offset_data + 100])
    assert one_line(bad / "cut.tar") == f"{bad}/cut.tar: cut short in member ant/ant_001.png (100 of its " \
                                        f"{third.size:,} bytes)"
    (bad / "cut2.tar").write_bytes(data[:third.offset])  # at a member's end: no end-of-archive blocks
    assert one_line(bad / "cut2.tar") == f"{bad}/cut2.tar: cut short after member ant/ant_000.cls"
    write_tar(bad / "unlabelled.tar", [("x.png", png), ("x.cls", b"1"), ("y.webp", png), ("y.txt", b"a bee")])
    assert one_line(bad / "unlabelled.tar") == f"{bad}/unlabelled.tar: member y.webp has no label (y.cls or y.json)"
    write_tar(bad / "words.tar", [("x.png", png), ("x.cls", b"two")])
    assert one_line(bad / "words.tar") == f"{bad}/words.tar: member x.cls: label b'two' is not an integer"
    classes = tmp_path / "classes"
    classes.mkdir()
    (classes / "classes.json").write_text('["ant", "bee", "cat"]')
    write_tar(classes / "a.tar", [("x.png", png), ("x.json", b'{"label": 2}'), ("y.png", png), ("y.cls", b"3")])
    assert one_line(classes) == f"{classes}/a.tar: member y.png: label 3 is outside the 3 classes of " \
                                f"{classes}/classes.json"
    # the same failure through an entry point: one line, no traceback
    from tokenizer import val_ddp

    with pytest.raises(SystemExit, match=rf"^error: {bad}/cut.tar: cut short in member ant/ant_001.png"):
        val_ddp.main(["--data-path", str(bad / "cut.tar"), "--image-size", "16", "--sample-dir", str(tmp_path)])


def test_an_unreadable_image_member_is_skipped_in_training_and_refused_in_evaluation(folder, tmp_path):
    pngs = sorted(folder.glob("bee/*.png"))[:3]
    tar = write_tar(tmp_path / "mixed.tar", [("a.png", pngs[0].read_bytes()), ("a.json", b'{"label": 1}'),
                                             ("b.png", b"\x89PNG\r\n\x1a\n broken"), ("b.cls", b"1"),
                                             ("c.png", pngs[2].read_bytes()), ("c.cls", b"0")])
    train = image_dataset(tar, train_transform(16), 16, fallback=True)
    assert [train[i][1:] for i in range(3)] == [(1, 0, 0), (0, 2, 1), (0, 2, 0)]  # b skipped (and counted), c took it
    evaluation = image_dataset(tar, eval_transform(16), 16)
    with pytest.raises(UnreadableImage, match=rf"^cannot read image {tar} member b.png \(evaluation needs every "
                                              r"image\)$"):
        list(eval_batches(evaluation, np.arange(3), 2, 0))


def test_code_extraction_reads_shards_as_it_reads_the_folder(setup, tmp_path):
    from autoregressive.data.code_store import CodeDataset, read_manifest
    from autoregressive.train import extract_codes

    shards.convert(setup / "data", tmp_path / "shards", prefix="train", max_count=5, log=lambda *a: None)
    args = ["--vq-ckpt", str(setup / "dual.pt"), "--image-size", "32", "--num-workers", "0", "--batch-size", "4"]
    stores = {}
    for name, data in (("folder", setup / "data"), ("shards", tmp_path / "shards" / "train-{000000..000002}.tar")):
        extract_codes.main(args + ["--data-path", str(data), "--code-path", str(tmp_path / name)])
        stores[name] = CodeDataset(tmp_path / name).__getitems__(list(range(12)))
    assert all(torch.equal(a, b) for a, b in zip(stores["folder"], stores["shards"]))  # codes and labels
    assert read_manifest(tmp_path / "shards").extra["classes"] == ["astronaut", "cat", "rocket"]
