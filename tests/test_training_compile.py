"""The training forwards compile as one graph (no graph break, so no host sync hidden in them), and compiled
training steps give the eager losses. On CPU the equality check compiles through dynamo and AOTAutograd
(``aot_eager``: the graph capture, functionalisation and autograd that inductor starts from); inductor's own code
generation for these models takes minutes on a 2-core CPU and is exercised on CUDA by ``pytest -m cuda``."""
import pytest
import torch
import torch._dynamo as dynamo

from autoregressive.models import FAR, far_config
from autoregressive.train import train_c2i
from test_far_pipeline import FAR_TINY
from test_tokenizer_training import TINY
from tiny import tiny_tokenizer_config
from tokenizer import train as tokenizer_train
from tokenizer.models import FactorizedTokenizer

CPU_BACKEND = "aot_eager"


def test_training_forwards_have_no_graph_breaks():
    torch.manual_seed(0)
    tokenizer = FactorizedTokenizer(tiny_tokenizer_config(3)).train()  # heads, entropy loss, disentanglement
    explained = dynamo.explain(tokenizer)(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert explained.graph_break_count == 0, explained.break_reasons
    far = FAR(far_config("FAR-T", 3, vocab_size=64, block_size=16, num_classes=3)).train()
    codes, labels = torch.randint(0, 64, (2, 16, 3)), torch.tensor([0, 2])
    explained = dynamo.explain(far)(codes, labels, targets=codes)
    assert explained.graph_break_count == 0, explained.break_reasons


def _tokenizer_losses(data, tmp_path, compiled: bool) -> list[dict]:
    args = tokenizer_train.get_parser("dual").parse_args(
        ["--data-path", str(data), *TINY, "--global-batch-size", "4", "--disc-start", "2", "--exp-name", "c",
         "--results-dir", str(tmp_path / ("compiled" if compiled else "eager")), "--no-local-save"])
    t = tokenizer_train.build(args, "dual")
    if compiled:
        t.train_model = torch.compile(t.model, backend=CPU_BACKEND)
        t.run_disc = t.train_disc = torch.compile(t.disc, backend=CPU_BACKEND)
    gen = torch.Generator().manual_seed(0)
    out = []
    for step in (1, 2, 3):  # the GAN switches on at step 2: both graphs of the discriminator
        images = torch.rand(4, 3, 32, 32, generator=gen) * 2 - 1
        logs, skipped, _ = tokenizer_train.train_step(t, images, step)
        assert not skipped
        out.append({k: float(v) for k, v in logs.items()})
    return out


def test_compiled_tokenizer_steps_match_eager(data, tmp_path):
    eager, compiled = _tokenizer_losses(data, tmp_path, False), _tokenizer_losses(data, tmp_path, True)
    for e, c in zip(eager, compiled):
        for k in ("loss", "rec_loss", "codebook_loss_vis", "entropy_loss_sem", "disentangle_loss", "grad_norm"):
            assert c[k] == pytest.approx(e[k], rel=1e-3, abs=1e-6), k
    assert compiled[-1]["disc_loss"] == pytest.approx(eager[-1]["disc_loss"], rel=1e-3)


def test_compiled_far_steps_match_eager(setup, tmp_path):
    losses = {}
    for compiled in (False, True):
        args = train_c2i.get_parser(2).parse_args(
            ["--code-path", str(setup / "codes"), *FAR_TINY, "--global-batch-size", "4", "--exp-name", "c",
             "--results-dir", str(tmp_path / str(compiled)), "--no-local-save", "--dropout-p", "0",
             "--token-dropout-p", "0"])
        t = train_c2i.build(args, 2)
        if compiled:
            t.train_model = torch.compile(t.model, backend=CPU_BACKEND)
        gen = torch.Generator().manual_seed(0)
        torch.manual_seed(1)  # label dropout draws from the global RNG
        steps = []
        for _ in range(3):
            codes, labels = torch.randint(0, 64, (4, 64, 2), generator=gen), torch.randint(0, 3, (4,), generator=gen)
            logs, skipped = train_c2i.train_step(t, codes, labels)
            assert not skipped
            steps.append({k: float(v) for k, v in logs.items()})
        losses[compiled] = steps
    for e, c in zip(losses[False], losses[True]):
        for k in ("loss", "loss_vis", "loss_sem", "grad_norm"):
            assert c[k] == pytest.approx(e[k], rel=1e-4), k
