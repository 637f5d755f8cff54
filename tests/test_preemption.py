"""Faults during training: a preemption signal (SIGTERM through torchrun, SIGUSR1 to one process) stops every rank
after its step with a checkpoint that resumes exactly; non-finite losses skip the update and, in a row, stop the
run without a bad checkpoint."""
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import FAR_TINY, TINY, interrupt, metrics, torchrun_cmd
from utils.steps import NonFiniteGuard, optimizer_step

ROOT = Path(__file__).resolve().parents[1]


def sigterm_torchrun(root: Path, name: str, common: list) -> int:
    """Train under torchrun, SIGTERM the launcher after two steps; the step every rank stopped after."""
    exp = root / "results" / f"FAR-T-{name}"
    code, out, err = interrupt(torchrun_cmd(*common, "--exp-name", name), exp / "metrics.jsonl", signal.SIGTERM,
                               root)
    stopped = metrics(exp / "metrics.jsonl")[-1]["step"]
    assert f"Stopped by SIGTERM after step {stopped}; resume with:" in out, err[-3000:]
    assert "--auto-resume" in out and "Traceback" not in out
    assert sorted(p.name for p in (exp / "checkpoints").iterdir()) == [f"{stopped:07d}.pt"]  # one, complete
    return stopped


def test_sigterm_under_fsdp_gathers_a_full_checkpoint(setup):
    common = ["autoregressive/train/train_c2i_dual.py", "--code-path", setup / "codes", *FAR_TINY,
              "--global-batch-size", "4", "--ckpt-every", "1000", "--fsdp"]
    stopped = sigterm_torchrun(setup, "preempt-fsdp", common)
    ckpt = torch.load(setup / "results" / "FAR-T-preempt-fsdp" / "checkpoints" / f"{stopped:07d}.pt",
                      weights_only=False)
    assert ckpt["model"]["norm.weight"].shape == (256,) and len(ckpt["resume"]["rng"]) == 2


def test_sigterm_through_torchrun_checkpoints_and_resumes_exactly(setup):
    root, name = setup, "preempt"
    common = ["autoregressive/train/train_c2i_dual.py", "--code-path", root / "codes", *FAR_TINY,
              "--global-batch-size", "4", "--ckpt-every", "1000"]
    exp = root / "results" / f"FAR-T-{name}"
    stopped = sigterm_torchrun(root, name, common)

    r = subprocess.run([str(c) for c in torchrun_cmd(*common, "--exp-name", name, "--auto-resume", "--max-steps",
                                                      stopped + 2)], capture_output=True, text=True, cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"checkpoints/{stopped:07d}.pt: step {stopped}" in r.stdout
    resumed = metrics(exp / "metrics.jsonl")
    assert [m["step"] for m in resumed] == list(range(1, stopped + 3))

    r = subprocess.run([str(c) for c in torchrun_cmd(*common, "--exp-name", name + "-ref", "--max-steps",
                                                      stopped + 2)], capture_output=True, text=True, cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    reference = metrics(root / "results" / f"FAR-T-{name}-ref" / "metrics.jsonl")
    for a, b in zip(reference, resumed):  # dropout and label dropout included
        assert a["step"] == b["step"] and a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"]


def test_sigusr1_stops_one_tokenizer_process_cleanly(data, tmp_path):
    cmd = [sys.executable, ROOT / "tokenizer/vq_train_dual.py", "--data-path", data, *TINY,
           "--global-batch-size", "2", "--ckpt-every", "1000", "--disc-start", "2", "--exp-name", "u"]
    exp = tmp_path / "results_tokenizer_image" / "VQ-16-u"
    code, out, err = interrupt(cmd, exp / "metrics.jsonl", signal.SIGUSR1, tmp_path, after_steps=1)
    assert code == 0, err[-3000:]
    stopped = metrics(exp / "metrics.jsonl")[-1]["step"]
    assert f"Stopped by SIGUSR1 after step {stopped}" in out
    ckpt = torch.load(exp / "checkpoints" / f"{stopped:07d}.pt", weights_only=False)
    assert ckpt["steps"] == stopped and {"discriminator", "optimizer_disc", "resume"} <= set(ckpt)


def test_nonfinite_steps_are_skipped_then_stop_the_run(setup):
    # lr 1e30: the first update is finite but enormous, every later loss is inf/nan.
    root = setup
    r = subprocess.run([sys.executable, ROOT / "autoregressive/train/train_c2i_dual.py", "--code-path",
                        root / "codes", *FAR_TINY, "--global-batch-size", "4", "--lr", "1e30", "--ckpt-every", "2",
                        "--max-steps", "20", "--max-nonfinite-steps", "3", "--exp-name", "nan"],
                       capture_output=True, text=True, cwd=root)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "3 optimizer steps in a row" in r.stderr.strip().splitlines()[-1]
    exp = root / "results" / "FAR-T-nan"
    logged = metrics(exp / "metrics.jsonl")
    assert [m["nonfinite_steps"] for m in logged] == [0, 1, 1, 1]
    for ckpt in (exp / "checkpoints").iterdir():  # never a checkpoint with non-finite weights
        weights = torch.load(ckpt, weights_only=False)["model"]
        assert all(torch.isfinite(w).all() for w in weights.values())


def test_optimizer_step_skips_nonfinite_gradients_on_the_device():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    guard = NonFiniteGuard(torch.device("cpu"), limit=2)

    def step(loss_scale: float):
        opt.zero_grad()
        (model(torch.ones(3, 4)).sum() * loss_scale).backward()
        return optimizer_step(opt, scaler, model.parameters(), max_grad_norm=1.0)

    norm, skipped = step(1.0)
    assert not skipped and float(norm) > 0
    guard.update(skipped)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    steps_before = [s["step"].clone() for s in opt.state.values()]
    for _ in range(2):
        norm, skipped = step(float("nan"))
        assert skipped and not torch.isfinite(norm)
        guard.update(skipped)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched
        assert all(torch.equal(a, s["step"]) for a, s in zip(steps_before, opt.state.values()))
    check = guard.check()
    assert check.skipped == 2 and "2 optimizer steps in a row" in check.error
    _, skipped = step(1.0)
    guard.update(skipped)
    assert not skipped and guard.check() == (0, None)


def test_killed_extraction_resumes_without_redoing_finished_images(setup, tmp_path, monkeypatch):
    from autoregressive.data import code_store
    from autoregressive.train import extract_codes

    args = ["--vq-ckpt", str(setup / "dual.pt"), "--data-path", str(setup / "data"), "--image-size", "32",
            "--num-workers", "0", "--batch-size", "4"]
    extract_codes.main(args + ["--code-path", str(tmp_path / "reference")])
    reference = code_store.CodeDataset(tmp_path / "reference")

    real_write, calls = code_store.CodeStoreWriter.write, []

    def dies_after_one_batch(self, *a, **k):
        if calls:
            raise KeyboardInterrupt  # stands for the kill: nothing after the first batch is written
        calls.append(1)
        real_write(self, *a, **k)

    monkeypatch.setattr(code_store.CodeStoreWriter, "write", dies_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        extract_codes.main(args + ["--code-path", str(tmp_path / "codes")])
    monkeypatch.setattr(code_store.CodeStoreWriter, "write", real_write)
    partial = np.load(tmp_path / "codes" / ".codes_00000.npy.tmp", mmap_mode="r+")
    partial[0] = 63  # mark a finished image: a resumed run must not encode it again
    partial.flush()
    del partial

    extract_codes.main(args + ["--code-path", str(tmp_path / "codes")])
    resumed = code_store.CodeDataset(tmp_path / "codes")
    assert len(resumed) == len(reference) == 12 and not list((tmp_path / "codes").glob(".*"))
    codes, labels = resumed.__getitems__(list(range(12)))
    ref_codes, ref_labels = reference.__getitems__(list(range(12)))
    assert torch.equal(labels, ref_labels)
    assert (codes[0] == 63).all()  # kept from the interrupted run
    assert torch.equal(codes[1:], ref_codes[1:])  # the first batch's other images as encoded then, the rest now


def test_killed_sampling_resumes_without_regenerating_finished_images(setup, tmp_path, monkeypatch):
    from autoregressive.models import FAR, far_config, save_far
    from autoregressive.sample.sample_c2i import main as sample
    from utils import npz

    torch.manual_seed(0)
    save_far(tmp_path / "far.pt", FAR(far_config("FAR-T", 2, vocab_size=64, block_size=64, num_classes=3)))
    args = ["--vq-ckpt", str(setup / "dual.pt"), "--gpt-ckpt", str(tmp_path / "far.pt"), "--gpt-model", "FAR-T",
            "--image-size", "32", "--image-size-eval", "32", "--downsample-size", "4", "--num-classes", "3",
            "--cfg-scale", "2.0", "--num-fid-samples", "6", "--per-proc-batch-size", "2", "--top-k", "16",
            "--sample-dir", str(tmp_path)]
    reference = np.load(sample(args + ["--name", "reference"], 2))

    real_mark, marked = npz.ShardedNpzWriter.mark_done, []

    def dies_after_one_batch(self, count):
        if marked:
            raise RuntimeError("killed")  # the second batch is written but never recorded as done
        marked.append(count)
        real_mark(self, count)

    monkeypatch.setattr(npz.ShardedNpzWriter, "mark_done", dies_after_one_batch)
    with pytest.raises(RuntimeError):
        sample(args + ["--name", "run"], 2)
    monkeypatch.setattr(npz.ShardedNpzWriter, "mark_done", real_mark)
    layout = npz.NpzLayout({"arr_0": ((6, 32, 32, 3), np.uint8), "arr_1": ((6,), np.int64)})  # the npz, in place
    part = np.memmap(tmp_path / "run.npz.parts" / "npz.partial", np.uint8, "r+",
                     offset=layout.members["arr_0"].array_offset, shape=(6, 32, 32, 3))
    part[0] = 7  # mark a finished image: a resumed run must not generate it again
    part.flush()
    del part

    out = np.load(sample(args + ["--name", "run"], 2))
    assert (out["arr_0"][0] == 7).all()  # kept from the interrupted run
    assert np.array_equal(out["arr_0"][1:], reference["arr_0"][1:])  # the rest as an uninterrupted run makes them
    assert np.array_equal(out["arr_1"], reference["arr_1"])
    assert not (tmp_path / "run.npz.parts").exists()
