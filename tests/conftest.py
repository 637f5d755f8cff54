import sys
from pathlib import Path

import os

import torch

# Without a GPU, Triton kernels (the "triton" decode attention) run under Triton's interpreter. Triton must see
# TRITON_INTERPRET before it is imported: its standard-library functions are made at import time, and ones made
# without it cannot be called by an interpreted kernel. Never on a GPU machine: inductor's own kernels would run
# interpreted too.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# TensorFlow (the FID evaluator's tests load it) and Triton (imported lazily by torch._dynamo, e.g. on the first
# torch.device("meta") context) both bundle LLVM; loading Triton after TensorFlow in one process segfaults.
# Import it first, once, for the whole test session.
import torch._dynamo  # noqa: E402,F401

ROOT = Path(__file__).resolve().parents[1]
for p in (str(ROOT), str(ROOT / "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)


# ---------------------------------------------------------------------------------------------- shared fixtures
# Session-scoped: several test modules train on the same tiny data.
import pytest  # noqa: E402

@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """8 photo crops in 2 classes: tokenizer training data."""
    from demo.photos import build_photo_folder

    return build_photo_folder(tmp_path_factory.mktemp("train"), per_class=4, size=40, classes=["cat", "coffee"])


@pytest.fixture(scope="session")
def setup(tmp_path_factory):
    """A folder with tiny dual / triple tokenizers and the dual one's ten-crop code store of 12 photos."""
    from demo.photos import build_photo_folder
    from helpers import torchrun
    from tiny import tiny_tokenizer_config
    from tokenizer.models import FactorizedTokenizer, save_tokenizer

    root = tmp_path_factory.mktemp("far")
    data = build_photo_folder(root / "data", per_class=4, size=40, classes=["astronaut", "cat", "rocket"])
    torch.manual_seed(0)
    save_tokenizer(root / "dual.pt", FactorizedTokenizer(tiny_tokenizer_config(2)))
    save_tokenizer(root / "triple.pt", FactorizedTokenizer(tiny_tokenizer_config(3)))
    r = torchrun("autoregressive/train/extract_codes_c2i_dual_code.py", "--vq-ckpt", root / "dual.pt",
                 "--codebook-size", 64, "--data-path", data, "--code-path", root / "codes", "--image-size", 32,
                 "--ten-crop", "--crop-range", 1.1, "--num-workers", 0, cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    return root


@pytest.fixture
def private_cache(tmp_path_factory, monkeypatch):
    """The torch backend caches converted graphs under $XDG_CACHE_HOME/fqgan: keep tests out of the user's cache
    (``pytestmark = pytest.mark.usefixtures("private_cache")``)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg_cache"))
