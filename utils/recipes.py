"""The paper's training recipes, by name: ``--recipe NAME`` sets these flags' defaults (anything given on the
command line still wins), so the launch scripts are one torchrun line and a recipe reads as Python, not bash.

The tokenizer recipes keep 32 images per forward pass on any number of GPUs (``micro_batch_size``: the run
computes the gradient-accumulation steps): the paper trained on 8 GPUs x 32 images, and the images of one forward
pass are also the InfoNCE negatives of the semantic loss, the entropy loss's batch and the PatchGAN's BatchNorm
statistics, so 256 images in one pass would be another objective.
"""
from __future__ import annotations

_FQGAN = dict(image_size=256, vq_model="VQ-16", global_batch_size=256, micro_batch_size=32, codebook_size=16384,
              codebook_embed_dim=8, entropy_loss_ratio=0.03, epochs=40, lr=2e-4, with_disentanglement=True,
              disentanglement_ratio=0.1, with_clip_supervision=True, semantic_weight=0.5)

# tokenizer/vq_train_{dual,triple}.py: the FQGAN-Dual / FQGAN-Triple tokenizers (VQ-16, 16384 x 8 codebooks);
# LlamaGen's VQ-16 (one 16384 x 8 codebook, no semantic loss, no disentanglement: its vq_train.py defaults)
TOKENIZER_RECIPES = {
    "fqgan-dual": _FQGAN,
    "fqgan-triple": _FQGAN,
    "llamagen-vq": dict(image_size=256, vq_model="VQ-16", global_batch_size=128, codebook_size=16384,
                        codebook_embed_dim=8, epochs=40, lr=1e-4),
}
RECIPE_PRESETS = {"fqgan-dual": "dual", "fqgan-triple": "triple", "llamagen-vq": "single"}  # what each trains
PRESET_SCRIPTS = {"dual": "tokenizer/vq_train_dual.py", "triple": "tokenizer/vq_train_triple.py",
                  "single": "tokenizer/train.main(preset='single')"}

# autoregressive/train/train_c2i_{dual,triple}.py: FAR on ten-crop codes of ImageNet, 300 epochs (--gpt-model picks
# the size: FAR-B, FAR-L)
FAR_RECIPES = {
    "far": dict(image_size=256, vocab_size=16384, epochs=300, ckpt_every=125000, lr=1e-4, global_batch_size=256),
}
