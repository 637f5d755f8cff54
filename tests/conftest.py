import sys
from pathlib import Path

# TensorFlow (the FID evaluator's tests load it) and Triton (imported lazily by torch._dynamo, e.g. on the first
# torch.device("meta") context) both bundle LLVM; loading Triton after TensorFlow in one process segfaults.
# Import it first, once, for the whole test session.
import torch._dynamo  # noqa: E402,F401

ROOT = Path(__file__).resolve().parents[1]
for p in (str(ROOT), str(ROOT / "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)
