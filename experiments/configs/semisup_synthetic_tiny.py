"""Semi-supervised smoke run on the synthetic faces: FixMatch + EMA teacher, seconds on a CPU.

  ferjax train-semisup --config experiments/configs/semisup_synthetic_tiny.py \
      --workdir runs/semisup_tiny
  ferjax evaluate --workdir runs/semisup_tiny --split test

ResNet-10 at width 0.125, 32 px gray, 600 synthetic faces of which 10% keep their labels; 40
steps of 16 labelled + 48 unlabeled images. A check that the pipeline runs (pseudo-labels,
RandAugment, the teacher, checkpoints, evaluation), not a useful model: semisup_synthetic.py is
the CPU-sized real run. Measured: about 40 s on a busy 2-core CPU (compile ~25 s), validation
near chance, and mask_rate 0 throughout (a 40-step teacher is never 0.7 sure); add
--config.semisup.threshold_mode=flexmatch to see pseudo-labels used (its thresholds start at 0).
"""

from ferjax.kinds import semisup


def get_config():
  config = semisup.default_config()
  config.data.update(name="synthetic", image_size=32, channels=1, num_examples=600,
                     val_split="validation", label_fraction=0.1)
  config.model.update(name="resnet10", stem="small", width=0.125, input_norm="per_image")
  config.augment.update(crop="pad", crop_padding=2, flip=True)
  config.optim.update(name="adamw", lr=3e-3, weight_decay=1e-4, warmup_steps=5)
  config.semisup.update(threshold=0.7, ratio=3, ema_decay=0.99)
  config.train.update(num_steps=40, batch_size=16, num_devices=1, log_every=10, eval_every=20,
                      checkpoint_every=20)
  config.eval.batch_size = 128
  return config
