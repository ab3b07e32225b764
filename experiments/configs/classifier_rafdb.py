"""RAF-DB (basic, 7 classes), the FER-2013 recipe carried over: from-scratch ResNet-18 at 100 px RGB.

  ferjax data prepare rafdb --manual-dir ~/downloads/RAF-DB/basic     # once
  ferjax train --config experiments/configs/classifier_rafdb.py --workdir runs/rafdb_s0
  ferjax evaluate --workdir runs/rafdb_s0 --split test --tta flip

RAF-DB has train (12,271 faces) and test (3,068) only, so checkpoints are chosen on a seeded 10%
hold-out of train (data.val_split=None) by mean class accuracy and test selects nothing. The
aligned 100x100 RGB faces are used at their size with the standard stem (7x7/2 conv and pool:
25-13-7-4 maps). Everything else is classifier_fer2013.py's recipe: random crop with reflect
padding, flip, random erasing, label smoothing 0.1, SGD with Nesterov momentum, lr 0.1 with 2
warm-up epochs then cosine decay, weight decay 5e-4, batch 256, 60 epochs, bf16, flip
test-time augmentation. Not measured yet (no RAF-DB copy on the development machines); the
published papers start from face-pretrained weights (--config.model.init_from=DIR, see
`ferjax import-weights`) and reach 86-92% accuracy, a from-scratch ResNet-18 less.
Other seeds: --config.seed=1. Long-tail variants: e.g. --config.loss.name=logit_adjusted.
"""

from ferjax.kinds import classifier

TRAIN_EXAMPLES = 12271  # RAF-DB basic train images.
BATCH = 256
STEPS_PER_EPOCH = TRAIN_EXAMPLES * 0.9 / BATCH  # 43.1, after the 10% hold-out.


def get_config():
  config = classifier.default_config()
  config.data.name = "rafdb"
  config.data.image_size = 100
  config.data.channels = 3
  config.data.val_split = None  # Held out of train: RAF-DB has no validation split.
  config.data.val_fraction = 0.1

  config.model.name = "resnet18"
  config.model.stem = "standard"
  config.model.dtype = "bfloat16"

  config.augment.crop = "pad"
  config.augment.crop_padding = 8
  config.augment.flip = True
  config.augment.erasing_prob = 0.5

  config.loss.name = "ce"
  config.loss.label_smoothing = 0.1

  config.optim.name = "sgd"
  config.optim.lr = 0.1
  config.optim.momentum = 0.9
  config.optim.nesterov = True
  config.optim.weight_decay = 5e-4
  config.optim.schedule = "cosine"
  config.optim.warmup_steps = round(2 * STEPS_PER_EPOCH)

  config.train.batch_size = BATCH
  config.train.num_steps = round(60 * STEPS_PER_EPOCH)  # 2588
  config.train.num_devices = None
  config.train.log_every = 50
  config.train.eval_every = round(STEPS_PER_EPOCH)
  config.train.checkpoint_every = 500
  config.train.keep_checkpoints = 2
  config.train.best_metric = "mean_class_accuracy"

  config.eval.batch_size = 512
  config.eval.tta = "flip"
  return config
