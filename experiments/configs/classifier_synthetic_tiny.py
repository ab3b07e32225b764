"""Classifier smoke run on the synthetic faces: ResNet-10 at width 0.25, 32 px gray, CPU-sized.

  ferjax train --config experiments/configs/classifier_synthetic_tiny.py --workdir runs/clf_tiny
  ferjax evaluate --workdir runs/clf_tiny --split test

Expected: under 1 minute on a 2-core CPU (300 steps of 64 images; data generation, compile and
3 validations included: 52 s measured); validation and test mean class accuracy about 0.4
(chance: 1/7), with the rare classes (angry, fear) near zero recall: the plain baseline that
the long-tail methods are measured against.

CPU choices (ours, measured on the synthetic set): 32 px (the VAE-GAN's size), per-image
standardisation of the input (the synthetic faces vary widely in lighting), AdamW (SGD learns
far slower in a few hundred steps), flip but no random crop (crops slow learning in short runs).
"""

from ferjax.train import classifier


def get_config():
  config = classifier.default_config()
  config.data.name = "synthetic"
  config.data.image_size = 32  # small stem: 32-16-8-4 maps, none below 3x3.
  config.data.channels = 1
  config.data.val_split = "validation"

  config.model.name = "resnet10"
  config.model.stem = "small"
  config.model.width = 0.25
  config.model.input_norm = "per_image"

  config.augment.crop = "none"
  config.augment.flip = True

  config.optim.name = "adamw"
  config.optim.lr = 3e-3
  config.optim.weight_decay = 1e-4
  config.optim.warmup_steps = 20

  config.train.num_steps = 300
  config.train.batch_size = 64
  config.train.num_devices = 1  # Fake multi-device CPUs only add overhead.
  config.train.log_every = 25
  config.train.eval_every = 100
  config.train.checkpoint_every = 100
  config.eval.batch_size = 256
  return config
