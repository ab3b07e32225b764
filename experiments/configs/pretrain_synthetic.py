r"""MAE pre-training on the synthetic faces, CPU-sized: a 4-block ViT-Ti at width 0.5, 32 px gray.

  ferjax pretrain --config experiments/configs/pretrain_synthetic.py --workdir runs/mae_synthetic

Expected: 224 s measured on an idle 2-core Intel Xeon VM, 2026-12 (2000 steps of 64 images over
the 7000-face synthetic train split, 350 held out; compile and 4 validations included; the stage 1
of experiments/ssfer.py's synthetic table). The validation loss (normalised pixels of the masked
patches; 1.0 is predicting each patch's mean) went 0.846, 0.819, 0.805, 0.798 at steps
500..2000 (the faces' pixel noise keeps it from going much lower); reconstructions.png fills in
head shape, hair and lighting from a quarter of the patches, eyes and mouth blurry. (Before the
random-resized crops were added, flips only: 422 s on a busy CPU, losses 0.82 .. 0.75.)

A ViT classifier of the same shape starts from the encoder with
  ferjax train --config experiments/configs/classifier_synthetic.py --workdir runs/clf_mae \
      --config.model.name=vit_ti --config.model.width=0.5 --config.model.depth=4 \
      --config.model.patch_size=4 --config.optim.name=adamw --config.optim.lr=1e-3 \
      --config.model.init_from=runs/mae_synthetic

Choices (ours, for a CPU): 32 px with 4 px patches (64 patches, 16 visible), a 64-wide 2-block
decoder, lr 1.5e-3 with 100 warm-up steps; the rest is MAE's (mask ratio 0.75, AdamW 0.9 / 0.95,
weight decay 0.05, normalised-pixel targets, flips and random-resized crops of 0.2..1 of the area,
augment.crop_scale; `--config.augment.crop_scale=None` is the flips-only run).
"""

from ferjax.kinds import pretrain


def get_config():
  config = pretrain.default_config()
  config.data.update(sources="synthetic", image_size=32, channels=1, num_examples=None,
                     val_fraction=0.05)
  config.model.update(name="vit_ti", width=0.5, depth=4, patch_size=4)  # 96 wide, 3 heads
  config.mae.update(mask_ratio=0.75, decoder_width=64, decoder_depth=2, decoder_heads=4,
                    norm_pix_loss=True)
  config.augment.crop_scale = (0.2, 1.0)  # MAE's RandomResizedCrop
  config.optim.update(lr=1.5e-3, warmup_steps=100)
  config.train.update(num_steps=2000, batch_size=64, num_devices=1, log_every=50,
                      eval_every=500, checkpoint_every=500)
  return config
