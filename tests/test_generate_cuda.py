"""CUDA-only checks (``pytest -m cuda``; skipped without a GPU): compiled generation with CUDA graphs equals
eager generation, graphs are reused and their outputs stay valid, the sampler runs end to end under torchrun
with NCCL, and a bf16 FAR training step runs. CPU equivalents are in test_generate.py."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from autoregressive.models import FAR, far_config, generate, save_far
from autoregressive.models.generate import _runners
from autoregressive.sample.pipeline import ImageDecoder
from test_far_model import tiny_model
from test_generate import CHI2_1E4
from test_reconstruction_eval import torchrun
from tiny import tiny_tokenizer_config
from tokenizer.models import FactorizedTokenizer, save_tokenizer

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(autouse=True)
def exact_float32():
    """Equality with eager needs full float32 matmuls (TF32 rounds differently in fused and eager kernels)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def cuda_model(factors, **kw):
    # 8x8 grid: 64 positions, so the one graph runs every attention length from 1 to 64 entries
    return tiny_model(factors, block_size=64, **kw).float().cuda()


@pytest.mark.parametrize("factors,kw", [(2, {}), (3, dict(n_kv_head=2))])
def test_cuda_graph_generation_equals_eager(factors, kw):
    model = cuda_model(factors, **kw)
    labels = torch.tensor([3, 7, 0, 9], device="cuda")
    greedy = dict(cfg_scale=2.0, top_k=1, seed=3)
    eager = generate(model, labels, **greedy)
    before = counters["stats"]["unique_graphs"]
    compiled = generate(model, labels, compile=True, **greedy)  # inductor + one CUDA graph, replayed 64 times
    assert counters["stats"]["unique_graphs"] - before == 1  # one compilation for all 64 positions
    assert compiled.shape == (4, 64, factors) and torch.equal(compiled, eager)
    # replay with other inputs: the captured graphs are reused, and earlier results are not overwritten
    runner = _runners[model][1]
    assert runner.num_graphs == 1
    other = generate(model, labels.flip(0), compile=True, **{**greedy, "seed": 4})
    assert _runners[model][1] is runner
    assert torch.equal(other, generate(model, labels.flip(0), **{**greedy, "seed": 4}))
    assert torch.equal(compiled, eager)
    graphs_only = generate(model, labels, cuda_graphs=True, **greedy)  # eager kernels, captured
    assert torch.equal(graphs_only, eager)
    # the other decode kernels (their own graphs): the same codes as eager SDPA, up to a rare float near-tie
    for attention in ("reductions", "flex", "triton"):
        other = generate(model, labels, compile=True, attention=attention, **greedy)
        assert (other == eager).flatten(1).all(1).sum().item() >= 3, attention
    # cfg_interval: two plans (guided, then not), two graphs, the same compiled step for each
    interval = generate(model, labels, compile=True, cfg_interval=10, **greedy)
    assert _runners[model][1].num_graphs == 2
    assert torch.equal(interval, generate(model, labels, cfg_interval=10, **greedy))
    sampled = dict(cfg_scale=(1.5, 3.0, 2.0)[:factors], top_k=8, top_p=0.9, seed=5)
    ref = generate(model, labels, **sampled)
    got = generate(model, labels, compile=True, **sampled)
    # the random numbers are identical integers; only a float near-tie (rare) can separate a row, after which
    # the row continues differently: allow one row of the four
    assert (got == ref).flatten(1).all(1).sum().item() >= 3


def test_cuda_compiled_sampling_is_identically_distributed():
    """A two-sample test on a late position (many rows): compiled and eager sample the same distribution."""
    model = cuda_model(2)
    rows = 3000
    labels = torch.full((rows,), 5, device="cuda")
    kw = dict(cfg_scale=2.0, top_k=0)
    eager = generate(model, labels, 12, seed=1, **kw)[:, -1, 0].cpu().numpy()
    compiled = generate(model, labels, 12, seed=2, compile=True, **kw)[:, -1, 0].cpu().numpy()
    a, b = (np.bincount(x, minlength=40) for x in (eager, compiled))
    keep = (a + b) > 0
    stat = float((((a - b) ** 2)[keep] / (a + b)[keep]).sum())  # two-sample chi-square, equal sizes
    assert stat < CHI2_1E4[39]


@pytest.mark.parametrize("attention", ["sdpa", "reductions", "flex", "triton"])
def test_bf16_far_t_compiled_full_image(attention):
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = FAR(far_config("FAR-T", 3, vocab_size=512, block_size=64))
    for f in range(3):
        torch.nn.init.normal_(model.output_layer(f).weight, std=0.02)
    model = model.to(torch.bfloat16)
    labels = torch.arange(16, device="cuda")
    kw = dict(cfg_scale=2.0, top_k=0, seed=0, compile=True, attention=attention)
    codes = generate(model, labels, **kw)
    assert codes.shape == (16, 64, 3) and 0 <= codes.min() and codes.max() < 512
    again = generate(model, labels, **kw)
    assert torch.equal(again, codes)  # same seed, same graphs: the same codes


def test_sample_script_under_torchrun_nccl(tmp_path):
    torch.manual_seed(0)
    save_tokenizer(tmp_path / "dual.pt", FactorizedTokenizer(tiny_tokenizer_config(2)))
    far = FAR(far_config("FAR-T", 2, vocab_size=64, block_size=64, num_classes=3))
    for p in far.parameters():
        torch.nn.init.normal_(p, std=0.05)
    save_far(tmp_path / "far.pt", far)
    common = ["--vq-ckpt", tmp_path / "dual.pt", "--gpt-ckpt", tmp_path / "far.pt", "--gpt-model", "FAR-T",
              "--image-size", 32, "--image-size-eval", 32, "--downsample-size", 4, "--num-classes", 3,
              "--cfg-scale", 2.0, "--num-fid-samples", 21, "--top-k", 16, "--sample-dir", tmp_path]
    # compile and the decode stream on by default, batch size from free memory (the compiled decoder is timed by
    # the suite instead)
    r = torchrun("autoregressive/sample/sample_c2i_ddp_dual_code.py", *common, "--name", "auto",
                 "--no-compile-decoder", nproc=1, cwd=tmp_path, gpu=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--per-proc-batch-size" in r.stdout and "compile on" in r.stdout
    out = np.load(tmp_path / "auto.npz")
    assert out["arr_0"].shape == (21, 32, 32, 3) and out["arr_0"].dtype == np.uint8
    assert out["arr_1"].shape == (21,) and set(out["arr_1"].tolist()) <= {0, 1, 2}
    r = torchrun("autoregressive/sample/sample_c2i_ddp_dual_code.py", *common, "--name", "eager", "--no-compile",
                 "--per-proc-batch-size", 8, "--no-decode-stream", nproc=1, cwd=tmp_path, gpu=True)
    assert r.returncode == 0, r.stderr[-3000:]
    eager = np.load(tmp_path / "eager.npz")
    assert np.array_equal(eager["arr_1"], out["arr_1"])


def test_cuda_decoder_variants_agree():
    """bf16 + channels_last + compiled decoding stays within a few uint8 levels of float32 eager decoding."""
    torch.manual_seed(0)
    tok = FactorizedTokenizer(tiny_tokenizer_config(2)).cuda().eval()
    codes = torch.randint(0, 64, (6, 64, 2), device="cuda")
    ref = ImageDecoder(tok, grid=8, size=32, batch=4)(codes).int()
    fast = ImageDecoder(copy.deepcopy(tok), grid=8, size=32, batch=4, dtype=torch.bfloat16, channels_last=True,
                        compile=True)(codes).int()
    assert fast.shape == ref.shape == (6, 32, 32, 3)
    assert (fast - ref).abs().float().mean().item() < 2.0 and (fast - ref).abs().max().item() <= 24


def test_guidance_scales_reuse_the_cuda_graphs():
    """The scale is data to the captured graphs: a second scale replays them (no capture, no compilation) and
    gives what eager generation gives at that scale."""
    model = cuda_model(2)
    labels = torch.tensor([3, 7, 0, 9], device="cuda")
    first = generate(model, labels, compile=True, cfg_scale=1.5, top_k=1, seed=3)
    runner, before = _runners[model][1], counters["stats"]["unique_graphs"]
    second = generate(model, labels, compile=True, cfg_scale=2.5, top_k=1, seed=3)
    assert _runners[model][1] is runner and counters["stats"]["unique_graphs"] == before
    assert torch.equal(second, generate(model, labels, cfg_scale=2.5, top_k=1, seed=3))
    assert torch.equal(first, generate(model, labels, cfg_scale=1.5, top_k=1, seed=3))
