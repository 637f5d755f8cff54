"""`make demo` in miniature (--quick): every stage runs and writes its outputs."""
import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def test_demo_quick(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "demo/run.py"), "--out", str(tmp_path / "demo"), "--quick"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    out = tmp_path / "demo"
    m = json.loads((out / "metrics.json").read_text())
    assert {"psnr_init", "psnr_trained", "codebook_usage"} <= set(m)
    assert set(m["codebook_usage"]) == {"vis", "sem"} and all(0 < v <= 1 for v in m["codebook_usage"].values())
    assert 5 < m["psnr_init"] < 40 and 5 < m["psnr_trained"] < 40
    assert Image.open(out / "reconstructions.png").size[0] > 64
    assert Image.open(out / "samples.png").size[1] > 4 * 64  # one row per class
    assert "LPIPS is off" in r.stdout and "--with_clip_supervision" in r.stdout
    # the factor report of the untrained and the trained tokenizer, and the kNN accuracies before -> after
    sep = m["factor_report"]
    assert sep["chance"] == 0.25 and set(sep) == {"untrained", "trained", "chance"}
    for name in ("untrained", "trained"):
        assert set(sep[name]) == {"vis", "sem", "all"}
        assert all(0 <= v <= 1 for f in sep[name].values() for v in f.values())
        report = json.loads((out / "factor_report" / name / "report.json").read_text())
        assert report["num_images"] == 16 and report["classes"] == ["cat", "coffee", "hubble", "rocket"]
        assert Image.open(out / "factor_report" / name / "tsne.png").size[0] > 3 * 300
    assert "vis  kNN" in r.stdout and "sem  kNN" in r.stdout
