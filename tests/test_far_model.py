"""FAR generator: golden equivalence with the original code, cached decoding, checkpoint layout, input errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from autoregressive.models import (FAR, FARConfig, describe_far, far_config, generate, infer_far_config, load_far,
                                   load_far_weights, sample, save_far)
from autoregressive.models.generate import per_factor, row_keys, uniform_noise
from reference_weights import golden, reference_keys, reference_state_dict
from utils.checkpoint import CheckpointError

GOLDEN = golden()
SMALL = json.loads(str(GOLDEN["far_small_config"]))
CASES = {"far_small_dual": ("dual_vq16", 2), "far_small_triple": ("triple_vq16", 3)}
NO_DROPOUT = dict(token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0, attn_dropout_p=0.0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Decode-sized matmuls gain nothing from more CPU threads, and OpenMP barriers stall badly on a busy
    machine (5x slower measured on a loaded 2-core box), so this module runs single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=sorted(CASES))
def golden_model(request):
    name = request.param
    tok, factors = CASES[name]
    model = FAR(FARConfig(**SMALL, num_factors=factors, **NO_DROPOUT))
    load_far_weights(model, reference_state_dict(name))
    codes = torch.from_numpy(GOLDEN[f"{tok}/indices"].astype(np.int64)).T[None]  # (1, 256, F)
    return name, model.eval(), codes


def test_golden_teacher_forced(golden_model):
    name, model, codes = golden_model
    with torch.no_grad():
        out = model(codes, torch.tensor([207]), targets=codes)
    pos = torch.from_numpy(GOLDEN[f"{name}/tf_positions"])
    got = torch.stack([logits[0, pos] for logits in out.logits])
    ref = torch.from_numpy(GOLDEN[f"{name}/tf_logits"])
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() < 1e-4
    ref_loss = float(GOLDEN[f"{name}/tf_loss"])
    assert abs(out.loss.item() - ref_loss) <= 1e-4 * abs(ref_loss)
    assert out.losses.shape == (model.config.num_factors,)
    assert torch.allclose(out.losses.mean(), out.loss)


def test_golden_generation_cfg2_greedy(golden_model):
    name, model, _ = golden_model
    codes = generate(model, [207], cfg_scale=2.0, temperature=1.0, top_k=1, top_p=1.0)
    ref = torch.from_numpy(GOLDEN[f"{name}/cfg2_top1_tokens"].astype(np.int64))  # (F, 256)
    assert codes.shape == (1, 256, model.config.num_factors)
    assert torch.equal(codes[0].T, ref)
    assert not model.training


# ------------------------------------------------------------------------------------------------------------
# cached decoding == recomputing the whole sequence
# ------------------------------------------------------------------------------------------------------------
def tiny_model(num_factors=2, **kw) -> FAR:
    cfg = dict(dim=64, n_layer=2, n_head=4, ar_n_layer=2, vocab_size=40, block_size=16, num_classes=10,
               num_factors=num_factors, **NO_DROPOUT)
    cfg.update(kw)
    torch.manual_seed(0)
    model = FAR(FARConfig(**cfg)).double()
    with torch.no_grad():
        for p in model.parameters():  # well-spread distributions; the init would zero the outputs
            p.normal_(0.0, 0.3 if p.dim() > 1 else 1.0)
    return model.eval()


def generate_by_recomputing(model, labels, T, cfg_scale, cfg_interval, temperature, top_k, top_p, seed):
    """Reference sampler: the full teacher-forced forward for every (position, factor), no caches; the same
    counter-based random numbers (draw t * F + j of row i's stream)."""
    Fn = model.config.num_factors
    scales = per_factor(cfg_scale, Fn, "cfg_scale")
    temps, ks, ps = (per_factor(temperature, Fn, ""), per_factor(top_k, Fn, "", int), per_factor(top_p, Fn, ""))
    doubled = any(s != 1.0 for s in scales)
    labels = torch.as_tensor(labels)
    cond = torch.cat([labels, torch.full_like(labels, model.config.num_classes)]) if doubled else labels
    codes = torch.zeros(len(labels), T, Fn, dtype=torch.long)
    keys = row_keys(seed, torch.arange(len(labels)))
    with torch.no_grad():
        for t in range(T):
            for j in range(Fn):
                x = codes[:, :t + 1]
                logits = model(torch.cat([x, x]) if doubled else x, cond).logits[j][:, t]
                if doubled:
                    c, u = logits.chunk(2)
                    on = cfg_interval < 0 or t <= cfg_interval + 1
                    logits = c if not on or scales[j] == 1.0 else u + (c - u) * scales[j]
                noise = uniform_noise(keys, torch.tensor([t * Fn + j]), model.config.vocab_size)
                codes[:, t, j] = sample(logits, temps[j], ks[j], ps[j], uniform=noise)
    return codes


@pytest.mark.parametrize("factors,kw,sampling", [
    (2, {}, dict(cfg_scale=2.0, temperature=1.0, top_k=1, top_p=1.0, cfg_interval=-1)),
    (2, {}, dict(cfg_scale=(1.5, 3.0), temperature=(1.0, 0.7), top_k=(0, 8), top_p=(0.9, 1.0), cfg_interval=-1)),
    (3, dict(n_kv_head=2), dict(cfg_scale=(2.0, 1.0, 4.0), temperature=1.2, top_k=10, top_p=0.95, cfg_interval=5)),
    (1, {}, dict(cfg_scale=1.0, temperature=1.0, top_k=0, top_p=1.0, cfg_interval=-1)),
])
def test_cached_generation_equals_recomputation(factors, kw, sampling):
    model = tiny_model(factors, **kw)
    labels, T = [3, 7, 0], model.config.block_size
    got = generate(model, labels, T, seed=1, **sampling)
    ref = generate_by_recomputing(model, labels, T, seed=1, **sampling)
    assert got.shape == (3, T, factors)
    assert torch.equal(got, ref)
    # the caches are reused, not reallocated, and stale entries from the last run do not leak in
    k_ptr = model.layers[0].attention.kv_cache.k.data_ptr()
    again = generate(model, labels, T, seed=1, **sampling)
    assert torch.equal(again, got) and model.layers[0].attention.kv_cache.k.data_ptr() == k_ptr
    assert all(layer.attention.kv_cache.k.shape[2] == factors for layer in model.ar_head)


def test_static_and_trimmed_attention_agree():
    """The compiled path attends over the whole masked cache (static shapes), eager over its filled part."""
    model = tiny_model(2)
    codes = torch.randint(0, 40, (2, 5, 2))
    outs = []
    with torch.no_grad():
        for trimmed in (False, True):
            model.setup_caches(2)
            h = [model.trunk_step(model.cls_embedding(torch.tensor([1, 2]))[:, None], torch.tensor([0]))]
            for t in range(5):
                h.append(model.trunk_step(model.embed_position(codes[:, t]), torch.tensor([t + 1]),
                                          t + 2 if trimmed else None))
            outs.append(torch.cat(h, 1))
    assert torch.allclose(outs[0], outs[1], atol=1e-12)


def test_caches_stay_out_of_the_state_dict_and_rope_stays_float32():
    model = tiny_model(2)
    keys = set(model.state_dict())
    generate(model, [1], 4, cfg_scale=2.0, top_k=1)
    assert set(model.state_dict()) == keys and not any("cache" in k or "rope" in k for k in keys)
    model = model.to(torch.bfloat16)
    assert model.rope.dtype == torch.float32 and model.aggregation_layer.weight.dtype == torch.bfloat16
    assert generate(model, [1, 2], 4, cfg_scale=2.0, top_k=1).shape == (2, 4, 2)
    with torch.device("meta"):
        model = FAR(far_config("FAR-T", 2, vocab_size=64, block_size=16))
    model = model.to_empty(device="cpu")
    assert torch.equal(model.rope, FAR(model.config).rope)


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    assert sample(logits, top_k=1).item() == 3 and sample(logits, temperature=0).item() == 3
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([sample(logits.repeat(500, 1), top_k=2, generator=g) for _ in range(4)])
    assert set(draws.tolist()) == {2, 3}
    probs = logits.softmax(-1)[0]  # 0.032, 0.087, 0.237, 0.644: top_p 0.7 keeps {3, 2}
    draws = sample(logits.repeat(2000, 1), top_p=0.7, generator=g)
    assert set(draws.tolist()) == {2, 3}
    assert abs((draws == 3).double().mean().item() - probs[3] / (probs[2] + probs[3])) < 0.04


# ------------------------------------------------------------------------------------------------------------
# released layout
# ------------------------------------------------------------------------------------------------------------
def meta_state_dict(name):
    return {e["key"]: torch.empty(e["shape"], device="meta") for e in reference_keys(name)}


@pytest.mark.parametrize("name,size,factors", [("far_dual_B", "FAR-B", 2), ("far_dual_L", "FAR-L", 2),
                                               ("far_triple_B", "FAR-B", 3)])
def test_released_layout_loads(name, size, factors):
    with torch.device("meta"):
        model = FAR(far_config(size, factors))
    layout = [(e["key"], tuple(e["shape"])) for e in reference_keys(name)]
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == layout
    load_far_weights(model, meta_state_dict(name))
    assert infer_far_config(meta_state_dict(name)) == far_config(size, factors)


def test_small_layout_and_config_inference():
    for name, (_, factors) in CASES.items():
        cfg = infer_far_config(reference_state_dict(name), n_head=SMALL["n_head"])
        assert cfg == FARConfig(**SMALL, num_factors=factors)


def test_mismatched_file_gives_one_clear_error():
    with torch.device("meta"):
        model = FAR(FARConfig(**SMALL, num_factors=2))
    sd = meta_state_dict("far_small_dual")
    del sd["ar_head.0.ffn_norm.weight"]
    sd["ar_head.1.ffn_norm.weight"] = torch.empty(256, device="meta")
    sd["output_2.weight"] = torch.empty(1000, 256, device="meta")
    with pytest.raises(CheckpointError) as e:
        load_far_weights(model, sd, "far_small.pt")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("far_small.pt: does not fit a dual FAR")
    assert "missing keys: ar_head.0.ffn_norm.weight" in msg
    assert "unexpected keys: ar_head.1.ffn_norm.weight" in msg
    assert "mis-shaped keys: output_2.weight (1000, 256) in file vs (16384, 256) in model" in msg
    # a dual file into a triple model
    with torch.device("meta"):
        triple = FAR(FARConfig(**SMALL, num_factors=3))
    with pytest.raises(CheckpointError, match=r"missing keys: tok_embeddings_3.weight, output_3.weight.*"
                                              r"mis-shaped keys: aggregation_layer.weight"):
        load_far_weights(triple, meta_state_dict("far_small_dual"))
    with pytest.raises(CheckpointError, match="not FAR weights"):
        infer_far_config({"encoder.conv_in.weight": torch.empty(1)})


def test_save_and_load_round_trip(tmp_path):
    model = tiny_model(3).float()
    ema = tiny_model(3).float()
    with torch.no_grad():
        ema.norm.weight.add_(1.0)
    path = tmp_path / "far.pt"
    save_far(path, model, ema=ema, steps=7)
    ckpt = torch.load(path, weights_only=True)
    assert set(ckpt) == {"model", "ema", "config", "steps"} and set(ckpt["model"]) == set(model.state_dict())
    loaded = load_far(path, expect_factors=3)  # the stored config gives what weights cannot (n_head, block_size)
    assert not loaded.training and loaded.config == model.config
    assert (loaded.loaded_from.weights, loaded.loaded_from.config_stored) == ("model", True)
    assert torch.equal(loaded.norm.weight, model.norm.weight)  # "model" weights, as the original sampler
    loaded = load_far(path, prefer=("ema",))
    assert loaded.loaded_from.weights == "ema" and "'ema' weights, its stored config" in str(loaded.loaded_from)
    codes = torch.randint(0, 40, (2, 16, 3))
    with torch.no_grad():
        assert torch.equal(loaded(codes, torch.tensor([1, 2])).logits[2], ema.eval()(codes, torch.tensor([1, 2])).logits[2])
    with pytest.raises(CheckpointError, match="2 factors were expected"):
        load_far(path, expect_factors=2)
    assert "triple FAR" in describe_far(loaded.config)


# ------------------------------------------------------------------------------------------------------------
# inputs, training behaviour
# ------------------------------------------------------------------------------------------------------------
def test_input_errors():
    model = tiny_model(2)
    labels = torch.tensor([1, 2])
    codes = torch.randint(0, 40, (2, 16, 2))
    codes[0, 3, 1], codes[1, 5, 1] = 40, 57
    with pytest.raises(ValueError, match=r"factor 2 \(sem\) are outside the vocabulary \[0, 39\]: 2 values in \[40, 57\]"):
        model(codes, labels)
    codes[..., 1] = 0
    codes[1, 2, 0] = -1
    with pytest.raises(ValueError, match=r"factor 1 \(vis\).*\[-1, -1\]"):
        model(codes, labels)
    with pytest.raises(ValueError, match=r"shape \(batch, positions, 2\) for its 2 factors.*got shape \(2, 16, 3\)"):
        model(torch.zeros(2, 16, 3, dtype=torch.long), labels)
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(2, 16, dtype=torch.long), labels)
    with pytest.raises(ValueError, match="at most 16"):
        model(torch.zeros(2, 17, 2, dtype=torch.long), labels)
    with pytest.raises(ValueError, match="class labels"):
        model(torch.zeros(2, 4, 2, dtype=torch.long), torch.tensor([1, 11]))
    with pytest.raises(ValueError, match="cfg_scale has 3 values but the model has 2 factors"):
        generate(model, [1], 2, cfg_scale=(1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match="num_positions"):
        generate(model, [1], 17)
    with pytest.raises(ValueError, match="null class"):
        generate(tiny_model(2, class_dropout_prob=0.0), [1], 2, cfg_scale=2.0)


def test_label_dropout_only_in_training():
    model = tiny_model(2, class_dropout_prob=1.0)  # every label dropped in training
    codes = torch.randint(0, 40, (2, 8, 2))
    labels, null = torch.tensor([1, 2]), torch.tensor([10, 10])
    with torch.no_grad():
        conditional = model.eval()(codes, labels).logits[0]
        unconditional = model(codes, null).logits[0]
        trained = model.train()(codes, labels).logits[0]
    assert not torch.allclose(conditional, unconditional)
    assert torch.equal(trained, unconditional)
    emb = tiny_model(2).cls_embedding  # class_dropout_prob 0.1
    many = torch.randint(0, 10, (20000,))
    torch.manual_seed(0)
    dropped = (emb.train()(many) == emb.embedding_table.weight[10]).all(-1).double().mean().item()
    assert abs(dropped - 0.1) < 0.01
    assert not (emb.eval()(many) == emb.embedding_table.weight[10]).all(-1).any()


def test_training_step_and_output_structure():
    model = tiny_model(3, token_dropout_p=0.1, resid_dropout_p=0.1, drop_path_rate=0.1).train()
    codes = torch.randint(0, 40, (2, 16, 3))
    out = model(codes, torch.tensor([1, 2]), targets=codes)
    assert [tuple(x.shape) for x in out.logits] == [(2, 16, 40)] * 3 and out.losses.shape == (3,)
    out.loss.backward()
    # the last factor's embedding is not an input of the factor head; it only reaches the next positions
    for name in ("tok_embeddings_3", "output_3", "aggregation_layer", "ar_head.1.attention.wqkv", "layers.0.ffn_norm"):
        assert model.get_submodule(name).weight.grad.abs().sum() > 0, name
    assert model(codes, torch.tensor([1, 2])).loss is None


def test_presets_and_fresh_init():
    cfg = far_config("FAR-B", "triple")
    assert (cfg.n_layer, cfg.dim, cfg.n_head, cfg.ar_n_layer, cfg.num_factors) == (24, 1024, 16, 3, 3)
    assert far_config("FAR-L").ffn_hidden_dim == 3584
    model = FAR(far_config("FAR-T", 2, vocab_size=64, block_size=16))
    assert model.output_1.weight.abs().sum() == 0  # zero output layers: uniform predictions at init
    with pytest.raises(ValueError, match="unknown model .FAR-XXL."):
        far_config("FAR-XXL")
