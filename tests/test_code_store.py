"""The generator's code store: round trip, augmentation choice, errors, and the loader."""
import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from autoregressive.data.code_store import CodeDataset, CodeStoreError, CodeStoreWriter, collate_codes, read_manifest


def _write(root, n=10, augs=3, factors=("vis", "sem"), vocab=16384, classes=5, seed=0):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, vocab, size=(n, augs, len(factors), 16))
    labels = rng.integers(0, classes, size=n)
    w = CodeStoreWriter(root, n, augs, list(factors), (4, 4), vocab)
    w.write(codes[:4], labels[:4])
    w.write(codes[4:], labels[4:])
    info = w.close(num_classes=classes, extra={"vq_ckpt": "x.pt"})
    return codes, labels, info


def test_round_trip(tmp_path):
    codes, labels, info = _write(tmp_path)
    assert info.num_items == 10 and read_manifest(tmp_path).extra == {"vq_ckpt": "x.pt"}
    assert np.load(tmp_path / "codes_00000.npy").dtype == np.uint16
    ds = CodeDataset(tmp_path, seed=1)
    assert len(ds) == 10
    c, y = ds.__getitems__([3, 7, 0])
    assert c.shape == (3, 16, 2) and c.dtype == torch.int64
    augs = ds.aug_index(np.array([3, 7, 0]))
    for row, i in enumerate([3, 7, 0]):
        assert torch.equal(c[row], torch.from_numpy(codes[i, augs[row]].T))
        assert y[row] == labels[i]
    # the augmentation depends on (seed, epoch, index), not on batching; it changes across epochs
    single = torch.stack([ds[i][0] for i in (3, 7, 0)])
    assert torch.equal(single, c)
    picks = {e: (ds.set_epoch(e), ds.aug_index(np.arange(10)))[1].tolist() for e in range(4)}
    assert len({tuple(v) for v in picks.values()}) > 1
    assert all(0 <= a < 3 for v in picks.values() for a in v)


def test_loader_batches(tmp_path):
    _write(tmp_path, n=40)
    ds = CodeDataset(tmp_path)
    batches = list(DataLoader(ds, batch_size=8, shuffle=True, collate_fn=collate_codes))
    assert len(batches) == 5 and batches[0][0].shape == (8, 16, 2) and batches[0][1].shape == (8,)


def test_errors(tmp_path):
    with pytest.raises(CodeStoreError, match="no manifest.json"):
        CodeDataset(tmp_path / "empty")
    _write(tmp_path / "dual")
    with pytest.raises(CodeStoreError, match="holds 2-factor codes \\(vis, sem\\), but 3 factors were expected"):
        CodeDataset(tmp_path / "dual", expect_factors=3)
    with pytest.raises(CodeStoreError, match="larger than --vocab-size 1024"):
        CodeDataset(tmp_path / "dual", vocab_size=1024)
    w = CodeStoreWriter(tmp_path / "bad", 2, 1, ["vis"], (4, 4), 100)
    with pytest.raises(CodeStoreError, match=r"outside \[0, 100\)"):
        w.write(np.full((1, 1, 1, 16), 100), np.zeros(1))
    with pytest.raises(CodeStoreError, match="wrote 0 of its 2 items"):
        w.close()
    m = tmp_path / "dual" / "manifest.json"
    info = json.loads(m.read_text())
    info["shards"][0]["count"] = 11
    m.write_text(json.dumps(info))
    with pytest.raises(CodeStoreError, match="holds 10 items, the manifest says 11"):
        CodeDataset(tmp_path / "dual")
