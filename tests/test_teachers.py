"""Semantic teachers: tiny random CLIP / DINOv2 checkpoints saved to disk and loaded by folder."""
import time

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from tokenizer.losses import FQGANLoss, LossConfig  # noqa: E402
from tokenizer.models import FactorConfig, FactorizedTokenizer, TokenizerConfig, tokenizer_config  # noqa: E402
from tokenizer.teachers import (CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, SemanticTeacher,  # noqa: E402
                                TeacherUnavailableError, Teachers, load_teacher,
                                load_teachers, teacher_flag, teacher_names, teacher_overrides_from_args)

SIZE = 32  # the tiny teachers' input size (real ones: 224)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    torch.manual_seed(0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=SIZE, patch_size=8)
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**vision)).save_pretrained(root / "clip_vision")
    full = transformers.CLIPConfig(vision_config={**vision, "hidden_size": 48, "num_attention_heads": 4},
                                   text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                    num_attention_heads=2, vocab_size=64, bos_token_id=0,
                                                    eos_token_id=1, pad_token_id=1),
                                   projection_dim=8)
    transformers.CLIPModel(full).save_pretrained(root / "clip_full")
    dino = transformers.Dinov2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, image_size=SIZE, patch_size=8)
    transformers.Dinov2Model(dino).save_pretrained(root / "dinov2")
    return {name: str(root / name) for name in ("clip_vision", "clip_full", "dinov2")}


def images(n=3, size=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def test_clip_teacher_outputs_the_pre_layernorm_class_token(folders):
    teacher = load_teacher(folders["clip_vision"], image_size=SIZE)
    assert teacher.family == "clip" and teacher.width == 32
    x = images()
    feats = teacher(x)
    assert feats.shape == (3, 32) and feats.dtype == torch.float32 and not feats.requires_grad
    # Reference: [-1, 1] -> [0, 1] -> nearest resize -> OpenAI CLIP normalisation -> last layer, token 0.
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    pix = (F.interpolate(x * 0.5 + 0.5, size=(SIZE, SIZE)) - mean) / std
    with torch.no_grad():
        out = teacher.model(pixel_values=pix, output_hidden_states=True)
    assert torch.allclose(feats, out.hidden_states[-1][:, 0], atol=1e-5)
    assert not torch.allclose(feats, out.pooler_output, atol=1e-3)  # pooler_output is after post_layernorm


def test_full_clip_checkpoint_gives_its_vision_tower(folders):
    teacher = load_teacher(folders["clip_full"], image_size=SIZE)
    assert isinstance(teacher.model, transformers.CLIPVisionModel)
    assert teacher.width == 48 and teacher(images(n=2)).shape == (2, 48)


def test_dinov2_teacher_uses_imagenet_normalisation_and_final_norm_class_token(folders):
    teacher = load_teacher(folders["dinov2"], image_size=SIZE)
    assert teacher.family == "dinov2" and teacher.width == 16
    x = torch.full((2, 3, SIZE, SIZE), 0.2)  # 0.6 after mapping to [0, 1]
    pix = teacher.preprocess(x)
    expected = (0.6 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(pix[0, :, 5, 7], expected, atol=1e-6)
    x = images(n=2)
    with torch.no_grad():
        out = teacher.model(pixel_values=teacher.preprocess(x))
    assert torch.allclose(teacher(x), out.last_hidden_state[:, 0], atol=1e-6)
    assert torch.allclose(teacher(x), out.pooler_output, atol=1e-6)


def test_preprocessing_resize_modes(folders):
    teacher = load_teacher(folders["dinov2"])  # default: the original's 224
    x = images(n=1, size=256)
    pix = teacher.preprocess(x)
    assert pix.shape == (1, 3, 224, 224)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(pix, (F.interpolate(x * 0.5 + 0.5, (224, 224)) - mean) / std, atol=1e-6)
    smooth = SemanticTeacher(teacher.model, "dinov2", resize_mode="bicubic").preprocess(x)
    ref = F.interpolate(x * 0.5 + 0.5, (224, 224), mode="bicubic", antialias=True)
    assert torch.allclose(smooth, (ref - mean) / std, atol=1e-5)
    with pytest.raises(ValueError, match="resize mode"):
        SemanticTeacher(teacher.model, "dinov2", resize_mode="area")


def test_teachers_are_frozen_and_stay_in_eval_mode(folders):
    teacher = load_teacher(folders["clip_vision"], image_size=SIZE)
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not any(m.training for m in teacher.modules())


def _config(sem_mid, sem_high, mid_width=16, high_width=32):
    return TokenizerConfig(
        factors=(FactorConfig("vis"), FactorConfig("sem_mid", head_width=mid_width, teacher=sem_mid),
                 FactorConfig("sem_high", head_width=high_width, teacher=sem_high)),
        ch=32, ch_mult=(1, 2), num_res_blocks=1, codebook_size=64, z_channels=32, adapter_layers=1,
        adapter_heads=4, head_layers=1, head_heads=4, base_image_size=SIZE)


def test_load_teachers_one_per_head_and_train_a_step(folders):
    cfg = _config(folders["dinov2"], folders["clip_vision"])
    teachers = load_teachers(cfg, image_size=SIZE)
    assert isinstance(teachers, Teachers) and teachers.factors() == [1, 2]
    x = images(n=4, size=SIZE)
    cls = teachers(x)
    assert {i: v.shape for i, v in cls.items()} == {1: (4, 16), 2: (4, 32)}
    model = FactorizedTokenizer(cfg).train()
    loss = FQGANLoss(LossConfig(perceptual_weight=0), model.factor_names)
    res = loss.generator_step(x, model(x), step=1, teacher_cls=cls)
    assert {"semantic_loss_sem_mid", "semantic_loss_sem_high"} <= set(res.logs())
    res.loss.backward()
    assert all(p.grad is None for p in teachers.parameters())


def test_overrides_and_flags(folders):
    cfg = _config("facebook/dinov2-small", "openai/clip-vit-base-patch16", high_width=48)
    from tokenizer.train import parse_config

    args = parse_config(["--data-path", "d", "--exp-name", "e", "--teacher-sem-mid", folders["dinov2"],
                         "--teacher-sem-high", folders["clip_full"]], "triple")
    overrides = teacher_overrides_from_args(args, cfg)
    assert overrides == {"sem_mid": folders["dinov2"], "sem_high": folders["clip_full"]}
    assert teacher_flag("sem_high") == "--teacher-sem-high"
    assert args.teacher_sem is None
    with pytest.raises(SystemExit):  # the triple trainer has no --teacher-sem (the dual preset's teacher)
        parse_config(["--data-path", "d", "--exp-name", "e", "--teacher-sem", "x"], "triple")
    teachers = load_teachers(cfg, overrides, image_size=SIZE)
    assert teachers[2].width == 48 and teachers[1].family == "dinov2"
    assert teacher_names(cfg, {2: "/x/y"})[2] == "/x/y"  # by index works too
    with pytest.raises(ValueError, match="unknown factor"):
        teacher_names(cfg, {"sem": "/x"})
    with pytest.raises(ValueError, match="no feature-prediction head"):
        teacher_names(cfg, {"vis": "/x"})


def test_width_mismatch_is_reported(folders):
    cfg = _config(folders["dinov2"], folders["clip_vision"], high_width=1024)
    with pytest.raises(ValueError, match="sem_high.*32-wide.*1024"):
        load_teachers(cfg, image_size=SIZE)


def test_missing_teachers_one_error_naming_them_all(monkeypatch, tmp_path):
    import huggingface_hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    start = time.monotonic()
    with pytest.raises(TeacherUnavailableError) as err:
        load_teachers(tokenizer_config("triple"))
    assert time.monotonic() - start < 20  # offline: no network retries
    msg = str(err.value)
    assert [m[1] for m in err.value.missing] == ["facebook/dinov2-small", "openai/clip-vit-base-patch16"]
    for needle in ("facebook/dinov2-small", "openai/clip-vit-base-patch16", "huggingface-cli download",
                   "--teacher-sem-mid", "HF_HUB_OFFLINE"):
        assert needle in msg
    with pytest.raises(TeacherUnavailableError, match="openai/clip-vit-large-patch14"):
        load_teachers(tokenizer_config("dual"))
    with pytest.raises(TeacherUnavailableError, match="no-such-folder"):
        load_teachers(tokenizer_config("dual"), {"sem": str(tmp_path / "no-such-folder")})


def test_no_heads_no_teachers():
    cfg = tokenizer_config("dual", with_feature_heads=False)
    teachers = load_teachers(cfg)
    assert len(teachers) == 0 and teachers(images(n=1)) == {}
