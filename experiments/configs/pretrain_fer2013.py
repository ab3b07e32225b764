r"""MAE pre-training of a ViT-S on FER-2013's faces (labels ignored), the accelerator run.

  ferjax pretrain --config experiments/configs/pretrain_fer2013.py \
      --workdir runs/mae_fer2013 --config.data.manual_dir=/path/to/fer2013

`data.manual_dir` holds the Kaggle folders or fer2013.csv; the dataset is prepared on first use.
Every image of its train and validation (PublicTest) splits is used, labels ignored, 5% of them
held out for the validation loss. The test split (PrivateTest) is left out unless
--config.data.include_test=True: a classifier tested on it would otherwise have seen its images
during pre-training (transductive; say so when reporting such a number).

48 px gray with 4 px patches: 144 patches, 36 visible per image. ViT-S (384 wide, 12 blocks,
6 heads), a 256-wide 4-block decoder, bfloat16 compute. 30k steps of 512 images is about 480
epochs of the ~32k images (MAE trains 800-1600 on ImageNet); lr 1.5e-4 * 512 / 256 (MAE's base
rate and scaling rule) with 2500 warm-up steps (about 40 epochs, as MAE). Augmentation as MAE's:
flips and random-resized crops of 0.2..1 of the area (augment.crop_scale).

Expected run time: not yet measured (no accelerator during development); estimate with
  ferjax bench pretrain --config experiments/configs/pretrain_fer2013.py
On a 2-core CPU a step takes seconds: not meant to run there.

A classifier starts from the encoder with
  --config.model.name=vit_s --config.model.patch_size=4 --config.model.init_from=runs/mae_fer2013
"""

from ferjax.kinds import pretrain


def get_config():
  config = pretrain.default_config()
  config.data.update(sources="fer2013", image_size=48, channels=1, val_fraction=0.05,
                     include_test=False)
  config.data.manual_dir = None  # Set on the command line (see above).
  config.model.update(name="vit_s", patch_size=4, readout="cls", dtype="bfloat16")
  config.mae.update(mask_ratio=0.75, decoder_width=256, decoder_depth=4, decoder_heads=8,
                    norm_pix_loss=True)
  config.augment.crop_scale = (0.2, 1.0)  # MAE's RandomResizedCrop
  config.optim.update(lr=3e-4, b1=0.9, b2=0.95, weight_decay=0.05, warmup_steps=2500)
  config.train.update(num_steps=30000, batch_size=512, log_every=200, eval_every=2500,
                      checkpoint_every=2500, keep_checkpoints=2)
  return config
