"""MAE pre-training smoke run on the synthetic faces: a 2-block ViT-Ti at width 0.25, 32 px gray.

  ferjax pretrain --config experiments/configs/pretrain_synthetic_tiny.py --workdir runs/mae_tiny

Expected: well under a minute on a 2-core CPU (50 steps of 32 images on 512 faces, compile and 2
validations included). The loss falls from about 1.0 (normalised pixels: predicting each patch's
mean) within the 50 steps; reconstructions.png shows blurry patch means, not faces: a check that
the pipeline runs, not a useful encoder (pretrain_synthetic.py is the CPU-sized real run).

A classifier of the same ViT shape starts from it with
  --config.model.name=vit_ti --config.model.width=0.25 --config.model.depth=2
  --config.model.patch_size=4 --config.model.init_from=runs/mae_tiny
"""

from ferjax.kinds import pretrain


def get_config():
  config = pretrain.default_config()
  config.data.update(sources="synthetic", image_size=32, channels=1, num_examples=512,
                     val_fraction=0.1)
  config.model.update(name="vit_ti", width=0.25, depth=2, patch_size=4)  # 48 wide, 64 patches
  config.mae.update(mask_ratio=0.75, decoder_width=32, decoder_depth=1, decoder_heads=4)
  config.optim.update(lr=1e-3, warmup_steps=5)
  config.train.update(num_steps=50, batch_size=32, num_devices=1, log_every=10, eval_every=25,
                      checkpoint_every=25)
  return config
