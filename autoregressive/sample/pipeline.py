"""The per-image sampling pipeline behind ``sample_c2i.py`` and ``benchmarks/sample_fid.py``:

    generate codes (compiled, CUDA graphs) -> decode (own batch, bf16, channels_last, compiled) -> uint8
    -> copy to pinned host memory (non-blocking) -> writer thread -> npz

The main thread only enqueues GPU work; it never waits for a copy or the disk: labels are checked once on the
host and reach the GPU through pinned memory, asynchronously. The writer thread waits on each batch's CUDA
event, then writes its rows, so writing overlaps the next batches' generation and decoding. Decoding runs on a
second CUDA stream (``decode_stream``; the sampler's default on a GPU), overlapping the next batch's
generation on the GPU itself.
"""
from __future__ import annotations

import queue
import threading
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from autoregressive.models.far import FAR, FARConfig, cache_length
from autoregressive.models.generate import generate
from tokenizer.models import FactorizedTokenizer
from utils.images import to_uint8

GiB = 1 << 30
MAX_AUTO_BATCH = 1024  # larger batches no longer pay: the KV-cache reads per image stay the same


# ------------------------------------------------------------------------------------------------------------
# batch size from free memory
# ------------------------------------------------------------------------------------------------------------
def generation_bytes_per_row(cfg: FARConfig, dtype: torch.dtype) -> int:
    """Device memory one generated row needs: its trunk and factor-head KV caches, plus the activations of
    one position step (float32 logits and their sampling temporaries dominate; ~8 vocab-wide rows)."""
    elt = torch.finfo(dtype).bits // 8
    kv = 2 * cfg.kv_heads * cfg.head_dim * elt * (cfg.n_layer * cache_length(cfg)
                                                  + cfg.ar_n_layer * cfg.num_factors)
    return kv + 8 * 4 * cfg.vocab_size + 16 * cfg.ffn_hidden_dim * elt


def decode_bytes_per_image(image_size: int, dtype: torch.dtype) -> int:
    """A generous estimate of the decoder's peak activations per image. At 256 px the last level holds a few
    256x256x128 maps at once: 17 MB each in bf16, 34 MB for the float32 GroupNorm/SiLU outputs of autocast;
    about 120-150 MB in all (twice that in float32)."""
    return int(160e6 * (image_size / 256) ** 2 * (1 if dtype != torch.float32 else 2))


@dataclass(frozen=True)
class BatchChoice:
    batch: int
    reason: str


def auto_batch_size(cfg: FARConfig, guided: bool, dtype: torch.dtype, device: torch.device, images_per_rank: int,
                    decode_batch: int, image_size: int) -> BatchChoice:
    """The generation batch per process: what fits in 75% of the free memory after the decoder's share
    (caches and activations for 2B rows with guidance), at most MAX_AUTO_BATCH, then evened out over this
    rank's images so the last batch is not mostly padding. A multiple of 8 (tensor-core friendly)."""
    if device.type != "cuda":
        return BatchChoice(min(32, max(1, images_per_rank)), "CPU default")
    free, total = torch.cuda.mem_get_info(device)
    rows = 2 if guided else 1
    per_image = rows * generation_bytes_per_row(cfg, dtype)
    budget = 0.75 * free - decode_batch * decode_bytes_per_image(image_size, dtype) - 2 * GiB
    fits = int(budget // per_image)
    if fits < 1:
        raise RuntimeError(f"not enough free GPU memory for one image ({free / GiB:.1f} GiB free, "
                           f"{per_image / GiB:.2f} GiB per image); lower --decode-batch-size")
    cap = min(fits, MAX_AUTO_BATCH)
    n_batches = -(-images_per_rank // cap)
    batch = -(-images_per_rank // n_batches)
    if cap >= 8:  # a multiple of 8, rounded up while it fits
        batch = -(-batch // 8) * 8 if -(-batch // 8) * 8 <= cap else cap // 8 * 8
    return BatchChoice(batch, f"{free / GiB:.1f} of {total / GiB:.1f} GiB free, {per_image / 2 ** 20:.0f} MiB per "
                              f"image, up to {fits} fit; {n_batches} batches for {images_per_rank} images")


# ------------------------------------------------------------------------------------------------------------
# decoding
# ------------------------------------------------------------------------------------------------------------
class ImageDecoder:
    """Codes (B, positions, F) -> uint8 images (B, size, size, 3) on the device, ``batch`` images at a time
    (the last chunk padded, so a compiled decoder sees one shape).

    dtype: bf16 runs the decoder under autocast (GroupNorm stays float32); channels_last: NHWC convolutions
    (the tensor-core layout); compile: torch.compile the whole decode (lookup, decoder, resize, uint8)."""

    def __init__(self, tokenizer: FactorizedTokenizer, grid: int, size: int, batch: int,
                 dtype: torch.dtype = torch.float32, channels_last: bool = False, compile: bool = False,
                 stream: Optional["torch.cuda.Stream"] = None):
        self.tok = tokenizer.eval()
        self.grid, self.size, self.batch = grid, size, batch
        self.dtype, self.channels_last, self.stream = dtype, channels_last, stream
        self.device = next(tokenizer.parameters()).device
        with torch.no_grad():  # the l2-normalised codebooks, once (codes come from generation: no range check)
            self.books = [branch.quantizer.codebook().detach().clone() for branch in tokenizer.factors]
        if channels_last:
            self.tok.post_quant_conv.to(memory_format=torch.channels_last)
            self.tok.decoder.to(memory_format=torch.channels_last)
        self._decode = torch.compile(self._decode_eager, dynamic=False) if compile else self._decode_eager

    def _decode_eager(self, indices: torch.Tensor) -> torch.Tensor:
        B = indices.shape[0]
        codes = torch.cat([book[indices[..., f]] for f, book in enumerate(self.books)], dim=-1)  # (B, T, F*D)
        codes = codes.view(B, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        codes = codes.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        amp = torch.autocast(self.device.type, dtype=self.dtype) if self.dtype != torch.float32 else nullcontext()
        with amp:
            images = self.tok.decode_codes(codes)
        images = images.float()
        if images.shape[-1] != self.size:
            images = F.interpolate(images, size=(self.size, self.size), mode="bicubic")
        return to_uint8(images)

    @torch.no_grad()
    def __call__(self, codes: torch.Tensor) -> torch.Tensor:
        ctx = torch.cuda.stream(self.stream) if self.stream is not None else nullcontext()
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the codes are ready
            codes.record_stream(self.stream)  # freed by the main stream later: not reused before decode ends
        with ctx:
            out = []
            for part in codes.split(self.batch):
                n = part.shape[0]
                if n < self.batch:
                    part = torch.cat([part, part[-1:].expand(self.batch - n, *part.shape[1:])])
                out.append(self._decode(part)[:n])
            return out[0] if len(out) == 1 else torch.cat(out)


# ------------------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------------------
class AsyncWriter:
    """Writes finished batches from a thread: ``put`` starts a non-blocking copy of the images into pinned
    host memory, records a CUDA event and queues the batch; the thread waits on the event and calls
    ``write(rows, images_uint8_numpy, payload)``. At most ``depth`` batches wait (bounded host memory).
    ``close`` (or leaving the ``with`` block) drains the queue and re-raises a failure of the thread."""

    def __init__(self, write: Callable[[np.ndarray, np.ndarray, object], None], depth: int = 3):
        self.write = write
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, name="sample-writer", daemon=True)
        self.thread.start()

    def put(self, rows: np.ndarray, images: torch.Tensor, payload=None,
            stream: Optional["torch.cuda.Stream"] = None) -> None:
        if self.error is not None:
            raise RuntimeError("the sample writer thread failed") from self.error
        event = None
        if images.device.type == "cuda":
            stream = stream or torch.cuda.current_stream(images.device)
            with torch.cuda.stream(stream):
                host = torch.empty(images.shape, dtype=images.dtype, pin_memory=True)
                host.copy_(images, non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
        else:
            host = images.cpu()
        self.queue.put((rows, host, payload, event))

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            rows, host, payload, event = item
            try:
                if self.error is None:
                    if event is not None:
                        event.synchronize()
                    self.write(rows, host.numpy(), payload)
            except BaseException as e:  # kept and re-raised in the main thread
                self.error = e

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise RuntimeError("the sample writer thread failed") from self.error

    def __enter__(self) -> "AsyncWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # stop the thread, keep the original exception
            self.queue.put(None)
            self.thread.join()


# ------------------------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------------------------
def sample_images(far: FAR, decoder: ImageDecoder, labels: np.ndarray, rows: np.ndarray, batch: int, seed: int,
                  write: Callable[[np.ndarray, np.ndarray, np.ndarray], None],
                  progress: Callable[[Iterable], Iterable] = iter,
                  features: Optional[Callable[[torch.Tensor], object]] = None, **generate_kw) -> None:
    """Generate, decode and write the images ``rows`` (global indices; ``labels`` holds every image's class)
    in batches of ``batch``. Image i draws from the random stream (seed, i), so it does not depend on the
    batch it falls in. Every batch has the same shape (the last is padded with copies of its last row): CUDA
    graphs and compiled decoders see one shape. ``write(rows, uint8 images (n, H, W, 3), labels)`` runs in
    the writer thread; this returns once every row is written. ``features`` (e.g. --fid-ref's Inception) sees
    each decoded uint8 batch on the device; then ``write`` gets ``(labels, features(images))`` instead of labels,
    so what it returns is stored with the images (and its device work overlaps the next batch)."""
    device = far.device
    if len(rows):  # the labels' values, once, on the host: generate() then skips its device-side look (a sync)
        far.check_labels(torch.from_numpy(np.asarray(labels[rows])), allow_null=False)
    with AsyncWriter(write) as writer:
        for i in progress(range(0, len(rows), batch)):
            part = rows[i:i + batch]
            padded = np.concatenate([part, np.repeat(part[-1:], batch - len(part))])
            y, row_ids = (to_device(torch.from_numpy(a), device) for a in (labels[padded], padded))
            codes = generate(far, y, far.config.block_size, seed=seed, row_ids=row_ids, check_label_values=False,
                             **generate_kw)
            images = decoder(codes)[:len(part)]
            payload = labels[part]
            if features is not None:  # on the decoder's stream: the writer's event then covers the features too
                with torch.cuda.stream(decoder.stream) if decoder.stream is not None else nullcontext():
                    payload = (payload, features(images))
            writer.put(part, images, payload, stream=decoder.stream)


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without stalling the host: on CUDA through pinned memory, copied
    asynchronously (the caching host allocator keeps the pinned block until the copy has run)."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
