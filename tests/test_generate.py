"""Generation at speed, on CPU: compiled (inductor) position steps equal eager ones, counter-based sampling is
uniform, follows the model's distribution and does not depend on the batch, and the sampling pipeline's
decoder and writer thread behave. The CUDA-graph paths are tested in test_generate_cuda.py."""
from __future__ import annotations

from contextlib import ExitStack

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

import torch.nn.functional as F

from autoregressive.models import decode_attention as decode_attention_module
from autoregressive.models import generate
from autoregressive.models.decode_attention import ATTENTION_KERNELS, decode_attention, single_query_attention
from autoregressive.models.generate import row_keys, sample, uniform_noise
from autoregressive.sample.pipeline import AsyncWriter, ImageDecoder, auto_batch_size
from test_far_model import tiny_model
from tiny import tiny_tokenizer_config
from tokenizer.models import FactorizedTokenizer


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # decode-sized work; see test_far_model.one_thread
    yield
    torch.set_num_threads(before)


def chi2_statistic(counts: np.ndarray, expected: np.ndarray) -> float:
    keep = expected > 0
    assert counts[~keep].sum() == 0, "samples where the distribution is zero"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


# chi-square critical values at p = 1e-4 (the tests are deterministic; this bounds how unlucky a seed may be)
CHI2_1E4 = {9: 33.7, 19: 51.2, 39: 78.0}


# ------------------------------------------------------------------------------------------------------------
# the decode kernels
# ------------------------------------------------------------------------------------------------------------
# The "triton" kernel runs under Triton's interpreter here: conftest sets TRITON_INTERPRET=1 without a GPU
# (before Triton is imported, which is when it must be set).
def test_triton_runs_interpreted_without_a_gpu():
    import os

    assert torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.parametrize("split", [True, False])
def test_every_kernel_equals_sdpa_on_the_filled_part(split, monkeypatch):
    """Each kernel at filled lengths 1, 16, 17 and the whole cache (48: three 16-blocks), plain and
    grouped-query heads (groups of 2 and 3), with large values beyond the length that must not leak in;
    also heads of 100 channels (GPT-3B's; the Triton kernel pads them to 128).
    ``split``: the Triton kernel splits the keys over several programs (few rows), or not (many rows)."""
    if not split:
        monkeypatch.setattr(decode_attention_module, "ENOUGH_PROGRAMS", 1)
    kernels = ATTENTION_KERNELS if split else ["triton"]
    gen = torch.Generator().manual_seed(0)
    for heads, kv_heads, d in ((4, 4, 16), (4, 2, 16), (4, 2, 100), (6, 2, 16)):  # the last one is used below
        q = torch.randn(2, heads, 1, d, generator=gen)
        k, v = torch.randn(2, 2, kv_heads, 48, d, generator=gen)
        for n in (1, 16, 17, 48):
            g = heads // kv_heads
            ref = F.scaled_dot_product_attention(q, k[:, :, :n].repeat_interleave(g, 1),
                                                 v[:, :, :n].repeat_interleave(g, 1))
            k2, v2 = k.clone(), v.clone()
            k2[:, :, n:], v2[:, :, n:] = 1e4, -1e4  # stale entries beyond the filled length
            for kernel in kernels:
                got = decode_attention(kernel, q, k2, v2, torch.tensor([n]))
                assert got.shape == q.shape and got.dtype == q.dtype
                torch.testing.assert_close(got, ref, atol=2e-6, rtol=0, msg=f"{kernel} {heads}/{kv_heads} n={n}")
    if not split:
        return
    # float64 stays float64 where the kernel computes in it (the reductions), length None is the whole cache
    q64, k64, v64 = q.double(), k.double(), v.double()
    ref = F.scaled_dot_product_attention(q64, k64.repeat_interleave(3, 1), v64.repeat_interleave(3, 1))
    assert torch.allclose(single_query_attention(q64, k64, v64), ref, atol=1e-12)
    for kernel in ATTENTION_KERNELS:
        torch.testing.assert_close(decode_attention(kernel, q, k, v), ref.float(), atol=2e-6, rtol=0)
    with pytest.raises(ValueError, match="attention must be one of"):
        generate(tiny_model(2), [1], attention="flash")


# ------------------------------------------------------------------------------------------------------------
# compiled == eager, one graph for every position
# ------------------------------------------------------------------------------------------------------------
COMPILED_POSITIONS = 4  # the first position (class token) and three more: every one runs the same graph
SAMPLING = {
    # factor 1 greedy, factor 2 sampled with top-k and top-p
    2: dict(cfg_scale=(1.5, 3.0), top_k=(1, 8), top_p=(1.0, 0.9), temperature=(1.0, 1.2)),
    # grouped-query heads, an unguided factor (scale 1), greedy, top-k and plain sampling
    3: dict(cfg_scale=(2.0, 1.0, 4.0), top_k=(1, 8, 0)),
}


NESTED_REGIONS = hasattr(torch.compiler, "nested_compile_region")  # PyTorch >= 2.8


@pytest.mark.parametrize("attention", ATTENTION_KERNELS)
@pytest.mark.parametrize("factors", [2, 3])
def test_compiled_generation_equals_eager(factors, attention):
    """Compiled generation with each decode kernel gives the codes of eager SDPA generation (greedy and sampled:
    the random numbers are the same integers). One compiled graph serves the whole generation, its first
    position included: the step compiles once, and another generation (other labels, seed) under
    ``error_on_recompile`` reuses it.

    The (2, sdpa) case also counts lowerings: the trunk's layers share one lowered block
    (``TransformerBlock.cached_step`` is a nested compile region), as do the factor head's layers at each of its
    F steps, so the qkv projection is lowered 1 + F times, not n_layer + F * ar_n_layer times. Its four layers'
    drop-path rates differ, as in a trained model: in eval mode they must not tell the blocks apart."""
    lowering = NESTED_REGIONS and factors == 2 and attention == "sdpa"
    kw = dict(n_kv_head=2) if factors == 3 else dict(n_layer=4, drop_path_rate=0.1) if lowering else {}
    model = tiny_model(factors, **kw).float()
    sampling = SAMPLING[factors]
    # interpreted Triton costs ~10 ms per program (one per row and KV head): fewer rows
    labels, other = ([3], [9]) if attention == "triton" else ([3, 7], [1, 9])
    eager = generate(model, labels, COMPILED_POSITIONS, seed=11, **sampling)
    counters.clear()
    with ExitStack() as caches_off:
        if lowering:  # a cached graph would skip lowering, which is what is counted
            caches_off.enter_context(torch._inductor.config.patch(fx_graph_cache=False))
            caches_off.enter_context(torch._functorch.config.patch(enable_autograd_cache=False))
        compiled = generate(model, labels, COMPILED_POSITIONS, seed=11, compile=True, attention=attention, **sampling)
    assert counters["stats"]["unique_graphs"] == 1
    assert torch.equal(compiled, eager)
    if lowering:
        assert len({layer.drop_path_p for layer in model.layers}) == 4
        qkv = model.layers[0].attention.wqkv.weight.shape[0]
        lowered = {key: n for key, n in counters["aten_mm_info"].items() if key.split("_")[2] == str(qkv)}
        assert sum(lowered.values()) == 1 + factors, lowered
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = generate(model, other, COMPILED_POSITIONS, seed=12, compile=True, attention=attention, **sampling)
    assert counters["stats"]["unique_graphs"] == 1
    assert torch.equal(again, generate(model, other, COMPILED_POSITIONS, seed=12, **sampling))


@pytest.mark.parametrize("attention", ATTENTION_KERNELS)
def test_compiled_gpt_generation_equals_eager(attention):
    """LlamaGen's GPT (one factor, no factor head, no aggregation layer) with GPT-3B's 100-channel heads:
    compiled generation with each decode kernel gives eager SDPA's codes (Triton pads the heads to 128;
    inductor's flex templates round them up themselves)."""
    model = tiny_model(1, ar_n_layer=0, dim=200, n_head=2).float()
    assert model.config.is_gpt and model.config.head_dim == 100
    labels = [3] if attention == "triton" else [3, 7]
    sampling = dict(cfg_scale=2.0, top_k=8, temperature=1.1)
    eager = generate(model, labels, COMPILED_POSITIONS, seed=5, **sampling)
    compiled = generate(model, labels, COMPILED_POSITIONS, seed=5, compile=True, attention=attention, **sampling)
    assert torch.equal(compiled, eager)


@pytest.mark.skipif(not NESTED_REGIONS, reason="PyTorch < 2.8")
def test_nine_factor_head_steps_trace_in_one_graph():
    """Each factor-head step is its own region entry (its attention length differs); nine of them exceed
    PyTorch's default cap of 8 entries, which is an error unless the region raises it."""
    model = tiny_model(9, ar_n_layer=1).float()
    model.setup_caches(2)
    x = torch.randn(2, 1, model.config.dim)
    heads = torch.compile(lambda m, h: [m.head_step(h, j) for j in range(9)], backend="eager", fullgraph=True)
    with torch.no_grad():  # as in generate (PyTorch 2.11 refuses cache writes in a region under autograd)
        for got, want in zip(heads(model, x), [model.head_step(x, j) for j in range(9)]):
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("attention", ["sdpa", "reductions", "flex"])  # Triton: in the kernel test (interpreted)
def test_prefix_attention_reads_only_the_filled_cache(attention):
    """Eager decoding reads the filled part of the cache only: stale entries beyond it cannot leak in."""
    model = tiny_model(2)
    kw = dict(cfg_scale=2.0, top_k=1, seed=0)
    labels = [4, 5]
    first = generate(model, labels, 4, attention=attention, **kw)
    for layer in list(model.layers) + list(model.ar_head):  # garbage in every cache slot
        layer.attention.kv_cache.k.normal_(0, 100.0)
        layer.attention.kv_cache.v.normal_(0, 100.0)
    assert torch.equal(generate(model, labels, 4, attention=attention, **kw), first)
    assert torch.equal(generate(model, labels, 4, **kw), first)


# ------------------------------------------------------------------------------------------------------------
# counter-based random numbers
# ------------------------------------------------------------------------------------------------------------
def test_uniform_noise_is_uniform_independent_and_reproducible():
    keys = row_keys(7, torch.arange(4000))
    u = uniform_noise(keys, torch.tensor([3]), 40)
    assert u.dtype == torch.float32 and u.shape == (4000, 40) and 0 < u.min() and u.max() < 1
    counts = np.histogram(u.numpy(), bins=20, range=(0, 1))[0]
    assert chi2_statistic(counts, np.full(20, u.numel() / 20)) < CHI2_1E4[19]
    v = uniform_noise(keys, torch.tensor([4]), 40)  # the next draw of the same rows
    corr = lambda a, b: float(np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1])  # noqa: E731
    assert abs(corr(u, v)) < 0.01 and abs(corr(u[:-1], u[1:])) < 0.01 and abs(corr(u[:, :-1], u[:, 1:])) < 0.01
    assert torch.equal(u, uniform_noise(row_keys(7, torch.arange(4000)), torch.tensor([3]), 40))
    assert not torch.equal(u, uniform_noise(row_keys(8, torch.arange(4000)), torch.tensor([3]), 40))
    big = row_keys(2 ** 62 + 5, torch.tensor([2 ** 40 + 1, 1]))  # both halves of seed and row id matter
    assert len(set(big.tolist()) | set(row_keys(5, torch.tensor([2 ** 40 + 1, 1])).tolist())) == 4


def test_sample_with_counter_noise_follows_the_probabilities():
    logits = torch.randn(10, generator=torch.Generator().manual_seed(0)) * 1.5
    probs = logits.softmax(-1).numpy()
    rows = 20000
    noise = uniform_noise(row_keys(3, torch.arange(rows)), torch.tensor([0]), 10)
    draws = sample(logits.repeat(rows, 1), uniform=noise)
    counts = np.bincount(draws.numpy(), minlength=10)
    assert chi2_statistic(counts, probs * rows) < CHI2_1E4[9]
    # top-k keeps the k best, renormalised
    draws = sample(logits.repeat(rows, 1), top_k=3,
                   uniform=uniform_noise(row_keys(4, torch.arange(rows)), torch.tensor([0]), 10))
    best = np.argsort(-probs)[:3]
    assert set(draws.unique().tolist()) == set(best.tolist())


def test_generation_samples_the_guided_model_distribution():
    """Position 0 of many rows of one class against the model's exact guided distribution."""
    model = tiny_model(2)
    rows, scale = 6000, 1.5
    codes = generate(model, [2] * rows, 1, cfg_scale=scale, seed=5)
    with torch.no_grad():
        dummy = torch.zeros(2, 1, 2, dtype=torch.long)
        logits = model(dummy, torch.tensor([2, model.config.num_classes])).logits[0][:, 0]
    guided = logits[1] + (logits[0] - logits[1]) * scale
    expected = guided.softmax(-1).numpy() * rows
    counts = np.bincount(codes[:, 0, 0].numpy(), minlength=40)
    assert chi2_statistic(counts, expected) < CHI2_1E4[39]


def test_rows_do_not_depend_on_their_batch():
    """Row i draws from the stream (seed, row id): one batch of six equals two batches of three, and the
    sample script's per-image results do not depend on the batch size or the number of processes."""
    model = tiny_model(3)
    labels = [1, 4, 4, 9, 0, 2]
    kw = dict(cfg_scale=2.0, top_k=0, top_p=0.95, temperature=1.1, seed=99)
    together = generate(model, labels, **kw)
    parts = [generate(model, labels[i:i + 3], row_ids=list(range(i, i + 3)), **kw) for i in (0, 3)]
    assert torch.equal(together, torch.cat(parts))
    shuffled = generate(model, labels[::-1], row_ids=list(range(6))[::-1], **kw)
    assert torch.equal(shuffled, together.flip(0))
    assert not torch.equal(generate(model, labels, **{**kw, "seed": 100}), together)
    with pytest.raises(ValueError, match="row_ids must be 6 integers"):
        generate(model, labels, row_ids=[0, 1], **kw)


# ------------------------------------------------------------------------------------------------------------
# the sampling pipeline's parts
# ------------------------------------------------------------------------------------------------------------
def test_image_decoder_matches_the_tokenizer_and_pads_the_last_chunk():
    torch.manual_seed(0)
    tok = FactorizedTokenizer(tiny_tokenizer_config(2)).eval()
    codes = torch.randint(0, 64, (5, 64, 2))  # 8x8 grid, 2 factors
    with torch.no_grad():
        ref = tok.decode_indices(codes.permute(0, 2, 1).reshape(5, 2, 8, 8))
    ref = torch.clamp(127.5 * ref + 128.0, 0, 255).permute(0, 2, 3, 1).to(torch.uint8)
    got = ImageDecoder(tok, grid=8, size=32, batch=2)(codes)  # chunks of 2, 2, 1 (+1 padding)
    assert got.shape == (5, 32, 32, 3) and got.dtype == torch.uint8
    assert (got.int() - ref.int()).abs().max() <= 1  # batch composition may move a rounding boundary
    resized = ImageDecoder(tok, grid=8, size=16, batch=8)(codes)
    assert resized.shape == (5, 16, 16, 3)


def test_async_writer_writes_every_batch_and_reports_failures():
    out = np.zeros((10, 2, 2, 3), np.uint8)
    written = []

    def write(rows, images, payload):
        out[rows] = images
        written.append(payload)

    with AsyncWriter(write, depth=1) as w:
        for start in range(0, 10, 3):
            rows = np.arange(start, min(start + 3, 10))
            w.put(rows, torch.full((len(rows), 2, 2, 3), start, dtype=torch.uint8), payload=start)
    assert written == [0, 3, 6, 9] and (out[:, 0, 0, 0] == [0, 0, 0, 3, 3, 3, 6, 6, 6, 9]).all()

    def broken(rows, images, payload):
        raise OSError("disk full")

    w = AsyncWriter(broken)
    w.put(np.arange(1), torch.zeros(1, 2, 2, 3, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="writer thread failed") as e:
        w.close()
    assert isinstance(e.value.__cause__, OSError)


def test_auto_batch_size_on_cpu_and_memory_model():
    from autoregressive.models import far_config
    from autoregressive.sample.pipeline import generation_bytes_per_row

    cfg = far_config("FAR-B", 2)
    per_row = generation_bytes_per_row(cfg, torch.bfloat16)
    kv = 24 * 2 * 16 * 257 * 64 * 2  # layers x (K, V) x heads x slots x head dim x bytes
    assert kv < per_row < 1.1 * kv
    assert auto_batch_size(cfg, True, torch.float32, torch.device("cpu"), 7, 8, 256).batch == 7
