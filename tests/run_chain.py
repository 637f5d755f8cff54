"""Run several entry-point scripts one after another in the same processes of ONE torchrun launch, each as its
command line would (``runpy`` with ``sys.argv``), so a test of a chain of command lines pays for process start,
imports and the process group once instead of once per script:

    torchrun --nproc_per_node=2 tests/run_chain.py chain.json     # [["script.py", "--flag", ...], ...]

Every entry point closes the process group when it ends (``utils.distributed.cleanup``); here that only waits for
the other ranks, and the group is closed once, after the last script. A script that exits (an error line) ends
the chain with its exit status.
"""
import json
import os
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import autoregressive.sample.sample_c2i  # noqa: E402
import autoregressive.train.extract_codes  # noqa: E402
import tokenizer.reconstruct  # noqa: E402
import utils.training  # noqa: E402
from utils.distributed import barrier, cleanup  # noqa: E402

for module in (autoregressive.sample.sample_c2i, autoregressive.train.extract_codes, tokenizer.reconstruct,
               utils.training):
    module.cleanup = barrier

for script, *args in json.loads(Path(sys.argv[1]).read_text()):
    if os.environ.get("RANK", "0") == "0":
        print(f"=== {script} {' '.join(args)}", flush=True)
    sys.argv = [script, *args]
    runpy.run_path(str(ROOT / script), run_name="__main__")
cleanup()
