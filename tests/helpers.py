"""What several test modules share: the tiny training flags, launching scripts under torchrun, interrupting a
run, photo crops, and the evaluator's command line and stand-in graph."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

# a tiny tokenizer run (32x32 images, 4x downsampling) and a tiny FAR run on its 8x8 codes
TINY = ["--image-size", "32", "--ch", "32", "--ch-mult", "1,2,2", "--num-res-blocks", "1", "--z-channels", "32",
        "--adapter-layers", "1", "--head-layers", "1", "--codebook-size", "64", "--codebook-embed-dim", "4",
        "--perceptual-weight", "0", "--num-workers", "0", "--log-every", "1", "--entropy-loss-ratio", "0.03",
        "--with_disentanglement"]
FAR_TINY = ["--gpt-model", "FAR-T", "--vocab-size", "64", "--image-size", "32", "--downsample-size", "4",
            "--num-classes", "3", "--num-workers", "0", "--log-every", "1"]


# ---------------------------------------------------------------- processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script, *args, nproc=2, cwd, gpu=False):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
           "--node_rank=0", f"--master_port={free_port()}", str(ROOT / script), *map(str, args)]
    # CPU processes with gloo unless `gpu`, also on a machine with a GPU (two ranks cannot share one under NCCL)
    env = dict(os.environ, OMP_NUM_THREADS="1", **({} if gpu else {"CUDA_VISIBLE_DEVICES": ""}))
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def torchrun_cmd(script: str, *args) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1", "--node_rank=0",
            f"--master_port={free_port()}", ROOT / script, *args]


def metrics(path: Path) -> list[dict]:
    """The lines of a metrics.jsonl file (none while it does not exist)."""
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def interrupt(cmd: list, metrics_file: Path, sig: int, cwd: Path, after_steps: int = 2):
    """Start ``cmd``, send ``sig`` once ``metrics_file`` shows ``after_steps`` logged steps, wait for the exit."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=cwd, env=env)
    deadline = time.time() + 240
    while len(metrics(metrics_file)) < after_steps and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def extract_killed_after_one_batch(argv, monkeypatch) -> None:
    """Run code extraction in-process with ``argv`` and let it die (KeyboardInterrupt) right after it has written
    and recorded its first batch, as a killed job would."""
    from autoregressive.data import code_store
    from autoregressive.train import extract_codes

    real_write = code_store.CodeStoreWriter.write

    def dies_after_one_batch(self, *a, **k):
        real_write(self, *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(code_store.CodeStoreWriter, "write", dies_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        extract_codes.main(argv)
    monkeypatch.setattr(code_store.CodeStoreWriter, "write", real_write)


# ---------------------------------------------------------------- images and the evaluator
def photo_crops(size=64, offset=0):
    from skimage import data
    crops = []
    for img in (data.astronaut(), data.coffee(), data.chelsea(), data.rocket()):
        for i in range(3):
            for j in range(4):
                y, x = offset + i * size, offset + j * size
                crops.append(img[y:y + size, x:x + size])
    return np.stack(crops)  # 48 x size x size x 3 uint8


EVALUATOR = ROOT / "evaluations" / "evaluator.py"
LABELS = ("Inception Score", "FID", "sFID", "Precision", "Recall")


def run_cli(*args, cwd, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "INCEPTION_GRAPH"}
    env.update(XDG_CACHE_HOME=str(cwd / "cache"), TF_CPP_MIN_LOG_LEVEL="2", **(env_extra or {}))
    return subprocess.run([sys.executable, str(EVALUATOR), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def parse_numbers(text):
    values = {}
    for ln in text.splitlines():
        label, sep, value = ln.partition(": ")
        if sep and label in LABELS:
            values[label] = float(value)
    return values


POOL_DIM, NUM_CLASSES = 16, 10


def write_fake_inception(path, with_spatial=True):
    """A tiny graph with the real graph's interface: DecodeJpeg -> Cast -> ExpandDims -> ResizeBilinear ->
    scaling, `mixed_6/conv` (here [N, 2, 2, 8]; 2x2x7 = 28 sFID features), `pool_3` ([N, 1, 1, 16]), a
    `pool_3/_reshape` with a hard-coded batch of 1 as in the real graph, and `softmax/logits/MatMul` + bias."""
    tf = pytest.importorskip("tensorflow").compat.v1
    rng = np.random.default_rng(0)

    def const(*shape):
        return tf.constant(rng.normal(0, 0.5, shape), tf.float32)

    g = tf.Graph()
    with g.as_default():
        img = tf.image.decode_jpeg(tf.constant(b"", name="DecodeJpeg/contents"), channels=3, name="DecodeJpeg")
        x = tf.expand_dims(tf.cast(img, tf.float32, name="Cast"), 0, name="ExpandDims")
        x = tf.image.resize_bilinear(x, [32, 32], name="ResizeBilinear")
        x = tf.multiply(tf.subtract(x, 128.0, name="Sub"), 1 / 128, name="Mul")
        x = tf.nn.relu(tf.nn.conv2d(x, const(3, 3, 3, 8), [1, 2, 2, 1], "SAME"))
        x = tf.nn.avg_pool(x, [1, 8, 8, 1], [1, 8, 8, 1], "VALID")
        if with_spatial:
            x = tf.nn.conv2d(x, const(1, 1, 8, 8), [1, 1, 1, 1], "SAME", name="mixed_6/conv")
        x = tf.nn.conv2d(tf.nn.relu(x), const(1, 1, 8, POOL_DIM), [1, 1, 1, 1], "SAME")
        pool = tf.nn.avg_pool(x, [1, 2, 2, 1], [1, 2, 2, 1], "VALID", name="pool_3")
        flat = tf.reshape(pool, [1, POOL_DIM], name="pool_3/_reshape")
        logits = tf.matmul(flat, const(POOL_DIM, NUM_CLASSES), name="softmax/logits/MatMul")
        tf.nn.softmax(tf.nn.bias_add(logits, const(NUM_CLASSES), name="softmax/logits"), name="softmax")
    Path(path).write_bytes(g.as_graph_def().SerializeToString())
    return path
