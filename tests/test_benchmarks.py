"""The benchmarks the GPU suite runs start, parse their flags and print their JSON on a CPU, at toy sizes.
GPU time is scarce (a lent machine for minutes): a benchmark that dies on a renamed flag or key there costs a
whole run, so each is run here the way benchmarks/gpu_suite.sh runs it, only smaller."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def bench(script: str, *args) -> list[dict]:
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *map(str, args)], capture_output=True,
                       text=True, cwd=ROOT, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("attention", ["sdpa", "reductions"])
def test_generate_benchmark_with_profile(attention):
    timing, profile = bench("generate.py", "--gpt-model", "FAR-T", "--device", "cpu", "--batch-size", 2,
                            "--num-positions", 6, "--loader-items", 0, "--attention", attention, "--profile")
    assert timing["benchmark"] == "generate" and timing["attention"] == attention and timing["ms_per_position"] > 0
    assert profile["benchmark"] == "generate_profile" and profile["attention"] == attention
    assert profile["profile_top"] and profile["profile_device_ms_per_position"] > 0


def test_sample_fid_benchmark():
    (result,) = bench("sample_fid.py", "--gpt-model", "FAR-T", "--device", "cpu", "--batch-size", 2, "--num-images",
                      2, "--image-size", 64, "--attention", "reductions")
    assert result["attention"] == "reductions" and result["num_images"] == 2 and result["images_per_s"] > 0
    assert {"gen_images_per_s", "decode_images_per_s", "minutes_for_50k"} <= set(result)
    assert {"setup_compile_s", "warmup_s", "capture_s"} <= set(result) and result["ms_per_position"]["1"] > 0


def test_attention_decode_benchmark_toy():
    """Every decode kernel at a toy size (eager; Triton interpreted, as conftest sets it without a GPU): one
    line per (kernel, length), each close to SDPA, and the summary naming the fastest."""
    *lines, summary = bench("attention_decode.py", "--toy")
    from autoregressive.models.decode_attention import ATTENTION_KERNELS

    assert {(r["kernel"], r["length"]) for r in lines} == {(k, n) for k in ATTENTION_KERNELS for n in (1, 17, 48)}
    assert all(r["us"] > 0 and r["gb_per_s"] > 0 and r["max_abs_err"] < 1e-5 for r in lines)
    assert summary["benchmark"] == "attention_decode_summary" and summary["fastest"] in ATTENTION_KERNELS
    assert not summary["failed"]


def test_training_benchmarks():
    (far,) = bench("train_far.py", "--device", "cpu", "--gpt-model", "FAR-T", "--batch-size", 2, "--iters", 1)
    assert far["benchmark"] == "train_far" and far["seconds_per_step"] > 0
    tok = bench("train_tokenizer.py", "--device", "cpu", "--batch-size", 1, "--image-size", 32, "--iters", 1)
    assert [r["step"] for r in tok] == ["model", "full"] and all(r["seconds_per_step"] > 0 for r in tok)


def test_data_benchmark_toy():
    """Folder against shards at a toy size, in this process (a subprocess would spend its time importing)."""
    from benchmarks import data

    before, threads = os.environ.get("XDG_CACHE_HOME"), torch.get_num_threads()
    lines = data.main(["--num-images", "24", "--source-size", "40", "--image-size", "32", "--batch-size", "8",
                       "--workers", "0,2"])
    assert os.environ.get("XDG_CACHE_HOME") == before and torch.get_num_threads() == threads  # left as they were
    assert [(r["source"], r["workers"]) for r in lines] == [("folder", 0), ("shards", 0), ("folder", 2), ("shards", 2)]
    assert all(r["benchmark"] == "data" and r["images"] == 24 and r["images_per_s"] > 0 for r in lines)
    assert lines[1]["shards"] == 1 and lines[1]["setup_s"] > 0 and lines[1]["setup_cached_s"] > 0
