"""AffectNet (7 classes), the FER-2013 recipe carried over: from-scratch ResNet-18 at 112 px RGB.

  ferjax data prepare affectnet --manual-dir ~/downloads/AffectNet    # once (also affectnet8)
  ferjax train --config experiments/configs/classifier_affectnet.py --workdir runs/affectnet_s0
  ferjax evaluate --workdir runs/affectnet_s0 --split validation --tta flip

AffectNet publishes train and a balanced validation set (500 faces per class) and no test set:
papers report on validation. So that the reported split chooses nothing, checkpoints are chosen
on a seeded 2% hold-out of train (data.val_split=None, about 5,700 faces) by mean class
accuracy, and `validation` is only evaluated at the end. The train images stay on disk and are
read in chunks straight onto the devices. The 8-class set (with contempt):
--config.data.name=affectnet8. Everything else is classifier_fer2013.py's recipe at 112 px with
the standard stem (28-14-7-4 maps): random crop with reflect padding, flip, random erasing,
label smoothing 0.1, SGD with Nesterov momentum, lr 0.1 with a 1-epoch warm-up then cosine
decay, weight decay 5e-4, batch 256, 10 epochs, bf16, flip test-time augmentation. The train
split is long-tailed (happy about 134,000 faces, disgust about 3,800), the validation split
balanced: --config.loss.name=logit_adjusted is the one-line baseline to compare against. Not
measured yet (no AffectNet copy on the development machines; a GPU run).
Other seeds: --config.seed=1.
"""

from ferjax.kinds import classifier

TRAIN_EXAMPLES = 283_901  # AffectNet 7-class train images (contempt left out).
BATCH = 256
STEPS_PER_EPOCH = TRAIN_EXAMPLES * 0.98 / BATCH  # 1086.8, after the 2% hold-out.


def get_config():
  config = classifier.default_config()
  config.data.name = "affectnet"
  config.data.image_size = 112
  config.data.channels = 3
  config.data.val_split = None  # Held out of train: validation is the reported split.
  config.data.val_fraction = 0.02

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
  config.optim.warmup_steps = round(STEPS_PER_EPOCH)

  config.train.batch_size = BATCH
  config.train.num_steps = round(10 * STEPS_PER_EPOCH)  # 10868
  config.train.num_devices = None
  config.train.log_every = 100
  config.train.eval_every = 1000
  config.train.checkpoint_every = 1000
  config.train.keep_checkpoints = 2
  config.train.best_metric = "mean_class_accuracy"

  config.eval.batch_size = 512
  config.eval.tta = "flip"
  return config
