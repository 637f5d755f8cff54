"""Sampling images' codes from FAR with static KV caches, classifier-free guidance and compiled position steps.

One image position is one step (``next_position``): one trunk step plus F factor-head steps:

    for every position t (pos = t):
        h = trunk_step(class embedding if t == 0 else aggregate(codes of t - 1))
        x = h
        for factor j in 0..F-1:  logits = head_step(x, j); guide; sample code j; x = embedding_j(code j)

Guidance batches the conditional and the unconditional (null class) rows together, so each step is ONE
forward pass over 2B rows: logits = uncond + scale * (cond - uncond), with a scale per factor. The scales
are data (a tensor), not constants of the compiled step: a guidance sweep reuses one compilation and one set
of CUDA graphs; only whether a factor is guided at all (scale != 1) is part of the plan. Both caches are
allocated once (and kept for the next generation if the shape matches); the factor head's cache holds just F
steps and is overwritten at every position, because step j writes slot j before any query reads it.

Position and attention length are DATA: the step reads one int64 tensor ``pos`` (the sequence position it
writes: 0 is the class token, p >= 1 the codes of grid position p - 1), writes the caches at ``pos``, attends
to the first ``pos + 1`` entries (a length tensor: masked beyond it, see ``decode_attention``) and samples
grid position ``pos`` (C = 1 class token). Every shape is static, so ONE compiled step serves every position of
a generation, the first included (its input is the class embedding, picked on the device by ``pos``).
``attention`` names the single-query kernel (``decode_attention.ATTENTION_KERNELS``: "sdpa", "reductions",
"flex", "triton").

Random numbers are counter-based: the uniform of (image row, position, factor, vocabulary entry) is a hash of
those integers and the seed, computed with integer tensor ops (``uniform_noise``). So sampling has no
generator state to carry, runs inside compiled graphs and CUDA graphs without a host sync, draws the same
numbers eagerly and compiled, and an image's codes depend only on (seed, its row id, its label), not on the
batch it was generated in or on the number of processes.

``compile=True`` compiles ``next_position`` (class or code embedding + trunk step + every factor-head step +
guidance + sampling) into ONE graph with torch.compile (``fullgraph=True``: a graph break is an error;
``dynamic=False``: static shapes, no dynamic dimension). It compiles once per sampling plan (one plan, or two
with ``cfg_interval``); inside it, every layer shares one compiled block (``TransformerBlock.cached_step``, a
nested compile region). On CUDA the step is captured as a CUDA graph once per plan, and the graph advances
``pos`` itself, so a generation is T replays (``CudaGraphGeneration``); the rules CUDA graphs impose are kept
there, explicitly: static buffers for everything that crosses a replay, nothing kept from the graph pool.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import time
import weakref
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .decode_attention import check_kernel
from .far import FAR

PerFactor = Union[float, int, Sequence[float], Sequence[int]]


def per_factor(value: PerFactor, num_factors: int, name: str, kind=float) -> tuple:
    """A scalar for every factor, or one value per factor (factor order: visual first)."""
    if isinstance(value, (int, float)):
        return (kind(value),) * num_factors
    values = tuple(kind(v) for v in value)
    if len(values) != num_factors:
        raise ValueError(f"{name} has {len(values)} values but the model has {num_factors} factors")
    return values


# ------------------------------------------------------------------------------------------------------------
# Counter-based random numbers
# ------------------------------------------------------------------------------------------------------------
_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply; the published constants of Wellons' hash-prospector) on
    int64 tensors holding values in [0, 2^32). Both multipliers are below 2^31, so every product stays below
    2^63: no overflow, hence identical integers in eager PyTorch, C++ and Triton kernels."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _M32
    return x ^ (x >> 15)


def row_keys(seed: Union[int, torch.Tensor], row_ids: torch.Tensor) -> torch.Tensor:
    """(B,) int64 keys of the random streams of rows ``row_ids`` (non-negative int64) under ``seed``."""
    seed = torch.as_tensor(seed, dtype=torch.int64, device=row_ids.device)
    s = _mix32(_mix32(seed & _M32) ^ ((seed >> 32) & _M32))
    return _mix32(_mix32(s ^ (row_ids & _M32)) ^ ((row_ids >> 32) & _M32))


def uniform_noise(keys: torch.Tensor, draw: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, vocab_size) float32 uniforms in (0, 1) for draw number ``draw`` (an int64 tensor of one element:
    position * F + factor) of the streams ``keys`` (B,). Each value is a pure function of (key, draw, vocab
    index): no state, no host sync, the same bits eagerly and compiled (24-bit integers, exact in float32)."""
    k = _mix32(keys ^ _mix32(draw.reshape(()) & _M32))                                      # (B,)
    v = _mix32(torch.arange(vocab_size, device=keys.device, dtype=torch.int64) * 2 + 1)  # (V,)
    x = _mix32(v[None, :] ^ k[:, None])
    return ((x >> 8).float() + 0.5) * 2.0 ** -24  # 24 random bits, centred: never 0 or 1


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generator: Optional[torch.Generator] = None, uniform: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One code per row of logits (B, V): temperature, then top-k, then nucleus (top-p) filtering.
    ``temperature == 0`` or ``top_k == 1`` is greedy (argmax). Randomness comes from ``uniform`` (B, V) in
    (0, 1) when given (``uniform_noise``), else from ``generator``."""
    if temperature == 0 or top_k == 1:
        return logits.argmax(-1)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # the mass before this code already exceeds top_p (keeps the 1st)
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    # Exponential race: argmax_i p_i / E_i with E_i ~ Exp(1) picks i with probability p_i, like
    # torch.multinomial, but without a host sync (it stays inside a CUDA graph).
    if uniform is not None:
        race = -torch.log(uniform)  # uniform is never 0 or 1, so race is finite and > 0
    else:
        race = torch.empty_like(probs).exponential_(generator=generator).clamp_min_(torch.finfo(probs.dtype).tiny)
    return (probs / race).argmax(-1)


# ------------------------------------------------------------------------------------------------------------
# One position
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplingPlan:
    """The constants of one generation's position steps: per-factor sampling, and how a decoding query
    attends (``attention``: a name of ``decode_attention.ATTENTION_KERNELS``). They are Python
    constants in compiled graphs (a different plan compiles once more), so hashable and frozen. The guidance
    scales themselves are not among them (a tensor passed to each step): only which factors are guided."""
    guided: tuple[bool, ...]        # per factor: mix in the unconditional logits (scale != 1)
    temperature: tuple[float, ...]
    top_k: tuple[int, ...]
    top_p: tuple[float, ...]
    doubled: bool                   # rows are [conditional; unconditional]
    attention: str = "sdpa"

    def unguided(self) -> "SamplingPlan":
        return dataclasses.replace(self, guided=(False,) * len(self.guided))


def decode_position(model: FAR, h: torch.Tensor, plan: SamplingPlan, keys: torch.Tensor,
                    t: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Sample the F codes of grid position ``t`` (an int64 tensor of one element) from the trunk output h
    (rows, 1, D); returns (B, F). With ``plan.doubled`` the rows are [conditional; unconditional] and both
    continue with the sampled codes. ``keys``: the (B,) random-stream keys (``row_keys``); ``scales``: the (F,)
    float32 guidance scales, read only for the factors ``plan.guided`` marks."""
    Fn, V = model.config.num_factors, model.config.vocab_size
    codes = []
    x = h
    for j in range(Fn):
        logits = model.head_step(x, j, plan.attention)
        if plan.doubled:
            cond, uncond = logits.chunk(2)
            logits = uncond + (cond - uncond) * scales[j] if plan.guided[j] else cond
        greedy = plan.temperature[j] == 0 or plan.top_k[j] == 1
        noise = None if greedy else uniform_noise(keys, t * Fn + j, V)
        code = sample(logits, plan.temperature[j], plan.top_k[j], plan.top_p[j], uniform=noise)
        codes.append(code)
        if j + 1 < Fn:
            x = model.tok_embedding(j)((code.repeat(2) if plan.doubled else code)[:, None])
    return torch.stack(codes, dim=1)


def next_position(model: FAR, prev: torch.Tensor, cond: torch.Tensor, pos: torch.Tensor, keys: torch.Tensor,
                  plan: SamplingPlan, scales: torch.Tensor, kv_len: Optional[int] = None) -> torch.Tensor:
    """One position step; (B, F) codes of grid position ``pos`` (C = 1 class token).

    ``pos``: an int64 tensor of one element, the sequence position this step writes. At ``pos == 0`` the
    trunk's input is the class embedding of ``cond`` (rows), else the embedding of ``prev`` (rows, F), the codes
    of the position before; both are computed and one is picked on the device, so the first position runs the
    same graph as the others. The queries attend to ``pos + 1`` cache entries (a length tensor). Every shape is
    static: compiled, one graph serves every position. Eager generation passes that length as ``kv_len`` (an
    int, ``pos + 1``) instead: the cache is sliced to the filled entries, so nothing past them is read."""
    C = model.config.cls_token_num
    first = (pos < C).view(1, 1, 1)
    x = torch.where(first, model.cls_embedding(cond)[:, None], model.embed_position(prev))
    h = model.trunk_step(x, pos, pos + 1 if kv_len is None else kv_len, plan.attention)
    return decode_position(model, h, plan, keys, pos - (C - 1), scales)


_compiled: dict = {}


def compiled_next_position():
    """``next_position`` compiled by inductor without CUDA graphs (we capture those ourselves, which keeps their
    static buffers under our control). ``dynamic=False``: every shape is static (position and length are
    tensors' values), and a new batch or model compiles a new static graph rather than turning sizes symbolic."""
    if "next" not in _compiled:
        _compiled["next"] = torch.compile(next_position, fullgraph=True, dynamic=False)
    return _compiled["next"]


def _recompile_limit(n: int, compile: bool = True):
    """Each model config, batch and plan compiles ``next_position`` once; tests and benchmarks that build
    several models in one process would exhaust dynamo's default budget (8) and fall back to eager silently.
    Eager generation needs no dynamo: importing it costs 1-2 s at every process start, so it is imported here."""
    if not compile:
        return contextlib.nullcontext()
    import torch._dynamo

    name = next(k for k in ("recompile_limit", "cache_size_limit") if hasattr(torch._dynamo.config, k))
    return torch._dynamo.config.patch(**{name: max(n, getattr(torch._dynamo.config, name))})


def _decode_attention():
    """SDPA backends for decoding: flash (bf16/fp16), memory-efficient (float32 or masked) or math; not cuDNN,
    which recent PyTorch prefers on H100/H200: cuDNN builds an execution plan per shape, and building one
    inside a CUDA-graph capture is not something to rely on."""
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


# ------------------------------------------------------------------------------------------------------------
# CUDA graphs: one per plan, advancing the position itself
# ------------------------------------------------------------------------------------------------------------
class CudaGraphGeneration:
    """One generation shape (model, rows, positions, plans) as CUDA graphs: ONE graph per distinct sampling plan
    (one, or two with ``cfg_interval``), each a single position step that also advances the position tensor
    ``pos`` inside the graph. A generation replays, for t = 0..T-1, the graph of position t's plan.

    The CUDA-graph rules, kept explicitly:
    * every tensor that crosses a replay has a static address and is allocated before capture, outside the
      graphs' memory pool: the KV caches, ``cond``, ``keys`` and ``scales`` (inputs, copied in before the replays),
      ``pos`` and ``prev`` (the position and the codes each replay leaves for the next) and ``out`` (the result,
      written at row ``pos`` inside the graph, cloned before returning);
    * no tensor allocated during capture is kept, so the graphs share one pool (they replay one after the other
      on one stream);
    * the position is data (``pos``), the random streams come from ``keys``: no host sync, no generator state;
    * each plan's step runs once before any capture (warm-up: one step per plan, not a generation), so
      compilation, autotuning and library initialisation never happen inside a capture. Shapes are static, so
      the one warm-up step has seen every kernel the other positions run.
    """

    @torch.no_grad()
    def __init__(self, model: FAR, batch: int, plans: Sequence[SamplingPlan], compile: bool):
        cfg = model.config
        dev = model.device
        self.batch, self.plans, self.compile = batch, tuple(plans), compile
        self.doubled = plans[0].doubled
        rows = 2 * batch if self.doubled else batch
        self.C = cfg.cls_token_num
        self.step = compiled_next_position() if compile else next_position
        self.cond = torch.zeros(rows, dtype=torch.long, device=dev)
        self.keys = torch.zeros(batch, dtype=torch.long, device=dev)
        self.scales = torch.ones(cfg.num_factors, dtype=torch.float32, device=dev)
        self.prev = torch.zeros(rows, cfg.num_factors, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.out = torch.zeros(batch, len(plans), cfg.num_factors, dtype=torch.long, device=dev)
        distinct = list(dict.fromkeys(self.plans))            # in order of first use
        self.schedule = [distinct.index(p) for p in self.plans]  # graph of each position
        stream = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        t0 = time.perf_counter()
        with torch.cuda.stream(stream), _recompile_limit(64, compile), _decode_attention():
            for plan in distinct:  # warm-up: one step per plan (compilation, autotuning)
                self._position(model, plan)
            torch.cuda.synchronize(dev)
            t1 = time.perf_counter()
            gc.collect()  # nothing collected mid-capture (torch.cuda.graph does the same, once per graph)
            self.graphs, pool = [], torch.cuda.graph_pool_handle()
            for plan in distinct:
                g = torch.cuda.CUDAGraph()
                # thread_local: another thread (the sampler's writer) may call CUDA APIs meanwhile
                g.capture_begin(pool=pool, capture_error_mode="thread_local")
                try:
                    self._position(model, plan)
                finally:
                    g.capture_end()
                self.graphs.append(g)
        torch.cuda.current_stream(dev).wait_stream(stream)
        torch.cuda.empty_cache()  # the warm-up's blocks sit cached for the side stream, unusable by the main one
        torch.cuda.synchronize(dev)
        # seconds: the warm-up steps (the compilation, when not done before) and the captures (benchmarks)
        self.timings = {"warmup_s": t1 - t0, "capture_s": time.perf_counter() - t1}

    def _position(self, m: FAR, plan: SamplingPlan) -> None:
        """One step at ``self.pos``: sample, store at row pos of ``out``, pass the codes on, advance ``pos``."""
        new = self.step(m, self.prev, self.cond, self.pos, self.keys, plan, self.scales)
        self.out.index_copy_(1, self.pos - (self.C - 1), new[:, None])
        self.prev.copy_(new.repeat(2, 1) if self.doubled else new)
        self.pos.add_(1)

    @torch.no_grad()
    def __call__(self, cond: torch.Tensor, keys: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        self.cond.copy_(cond)
        self.keys.copy_(keys)
        self.scales.copy_(scales)
        self.pos.zero_()
        for g in self.schedule:
            self.graphs[g].replay()
        return self.out.clone()  # the next generation overwrites self.out

    @property
    def num_graphs(self) -> int:
        return len(self.graphs)


_runners: "weakref.WeakKeyDictionary[FAR, tuple]" = weakref.WeakKeyDictionary()


def _cuda_graph_runner(model: FAR, batch: int, plans: tuple, compile: bool) -> CudaGraphGeneration:
    """The runner of this shape, one per model (kept outside the module, so copies and state dicts never see
    it). Graphs hold raw addresses: the key holds every parameter, buffer and cache address, so moving or
    re-casting the model, or new caches, capture new graphs instead of replaying stale ones."""
    tensors = [*model.parameters(), *model.buffers()]
    key = (batch, plans, compile, tuple((t.data_ptr(), t.dtype, t.shape) for t in tensors))
    held = _runners.get(model)
    if held is None or held[0] != key:
        _runners.pop(model, None)  # free the old graphs (and their pool) before capturing new ones
        _runners[model] = (key, CudaGraphGeneration(model, batch, plans, compile))
    return _runners[model][1]


# ------------------------------------------------------------------------------------------------------------
# generate
# ------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def generate(model: FAR, labels: Union[torch.Tensor, Sequence[int]], num_positions: Optional[int] = None, *,
             cfg_scale: PerFactor = 1.0, cfg_interval: float = -1, temperature: PerFactor = 1.0,
             top_k: PerFactor = 0, top_p: PerFactor = 1.0, generator: Optional[torch.Generator] = None,
             seed: Union[int, torch.Tensor, None] = None, row_ids: Union[torch.Tensor, Sequence[int], None] = None,
             compile: bool = False, cuda_graphs: Optional[bool] = None, attention: str = "sdpa",
             check_label_values: bool = True) -> torch.Tensor:
    """Sample codes for class ``labels`` (B,); returns (B, num_positions, F) int64, factor order as in training.

    cfg_scale, temperature, top_k, top_p: one value for all factors or a sequence of F values.
    Guidance is on when any scale differs from 1 (a factor with scale 1 uses its conditional logits).
    cfg_interval: as in LlamaGen, -1 guides every position; otherwise positions t > cfg_interval + 1 use the
    conditional logits only (the unconditional rows are still computed, keeping shapes static).
    num_positions: defaults to the full image (block_size); fewer gives a prefix (benchmarks, tests).
    seed, row_ids: row i samples from the random stream (seed, row_ids[i]) (default row ids 0..B-1), so its
    codes do not depend on the other rows. Without ``seed``, one is drawn from ``generator`` (or torch's
    global generator).
    compile: torch.compile the position step (inductor; one compilation for all positions and lengths).
    cuda_graphs: capture the position step as CUDA graphs, one per plan, replayed for every position (default:
    on with ``compile`` on a CUDA device; also usable without ``compile``). Graphs are captured on the first
    call for a shape and reused afterwards (also for other labels, seeds and guidance scales).
    attention: how each position's single query attends to the caches, one of
    ``decode_attention.ATTENTION_KERNELS`` ("sdpa", the default, "reductions", "flex", "triton").
    check_label_values: look at the labels' values (a host sync for device labels); a caller that checked
    them on the host already (the sampling pipeline) passes False. Shape and dtype are always checked.
    The model runs in eval mode; its previous mode is restored afterwards.
    """
    cfg = model.config
    Fn = cfg.num_factors
    device = model.device
    labels = torch.as_tensor(labels, device=device)
    model.check_labels(labels, values=check_label_values)
    scales = per_factor(cfg_scale, Fn, "cfg_scale")
    temps = per_factor(temperature, Fn, "temperature")
    ks = per_factor(top_k, Fn, "top_k", int)
    ps = per_factor(top_p, Fn, "top_p")
    check_kernel(attention)
    if any(t < 0 for t in temps):
        raise ValueError(f"temperature must be >= 0, got {temps}")
    doubled = any(s != 1.0 for s in scales)
    if doubled and not cfg.has_null_class:
        raise ValueError("classifier-free guidance needs the null class, but this model was built with "
                         "class_dropout_prob=0 (no null class row)")
    T = cfg.block_size if num_positions is None else int(num_positions)
    if not 1 <= T <= cfg.block_size:
        raise ValueError(f"num_positions must be in [1, {cfg.block_size}], got {T}")
    if cuda_graphs is None:
        cuda_graphs = compile and device.type == "cuda"
    if cuda_graphs and device.type != "cuda":
        raise ValueError(f"cuda_graphs needs the model on a CUDA device, not {device}")

    B = labels.shape[0]
    if seed is None:
        gen_device = generator.device if generator is not None else "cpu"
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=gen_device).item())
    if isinstance(seed, int) and not 0 <= seed < 2 ** 63:
        raise ValueError(f"seed must be in [0, 2^63), got {seed}")
    rows = torch.arange(B, device=device) if row_ids is None else torch.as_tensor(row_ids, device=device)
    if rows.shape != (B,) or rows.dtype.is_floating_point:
        raise ValueError(f"row_ids must be {B} integers (one per label), got {rows.dtype} {tuple(rows.shape)}")
    keys = row_keys(seed, rows.long())
    plan = SamplingPlan(tuple(s != 1.0 for s in scales), temps, ks, ps, doubled, attention)
    scale_data = torch.tensor(scales, dtype=torch.float32, device=device)  # data: a new scale compiles nothing
    plans = tuple(plan if cfg_interval < 0 or t <= cfg_interval + 1 else plan.unguided() for t in range(T))
    cond = torch.cat([labels, torch.full_like(labels, cfg.num_classes)]) if doubled else labels
    was_training = model.training
    model.eval()
    model.setup_caches(cond.shape[0])
    try:
        if cuda_graphs:
            return _cuda_graph_runner(model, B, plans, compile)(cond, keys, scale_data)
        step = compiled_next_position() if compile else next_position
        out = torch.empty(B, T, Fn, dtype=torch.long, device=device)
        prev = torch.zeros(cond.shape[0], Fn, dtype=torch.long, device=device)
        pos = torch.zeros(1, dtype=torch.long, device=device)  # data: one graph for every position
        with _recompile_limit(64, compile), _decode_attention():
            for t in range(T):
                # eager: the exact length as an int (the cache sliced); compiled: the length tensor pos + 1
                codes = step(model, prev, cond, pos, keys, plans[t], scale_data, None if compile else t + 1)
                out[:, t] = codes
                prev = codes.repeat(2, 1) if doubled else codes
                pos += 1
        return out
    finally:
        model.train(was_training)
