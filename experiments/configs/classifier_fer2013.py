"""FER-2013, the full GPU recipe of the FER literature: plain from-scratch ResNet-18.

  ferjax data prepare fer2013 --manual-dir ~/downloads/fer2013   # once
  ferjax train --config experiments/configs/classifier_fer2013.py --workdir runs/fer2013_s0
  ferjax evaluate --workdir runs/fer2013_s0 --split test --tta flip
  ferjax evaluate --workdir runs/fer2013_s0 --split test --tta flip --logit-adjust 1.0

ResNet-18 with the small-image stem (48-24-12-6 maps), 48 px gray, random crop with 4 px reflect
padding, horizontal flip, random erasing, label smoothing 0.1, SGD with Nesterov momentum 0.9,
lr 0.1 with 2 warm-up epochs then cosine decay, weight decay 5e-4, batch 256, 60 epochs, bf16,
flip test-time augmentation, the checkpoint chosen on PublicTest (data.val_split='validation')
once per epoch. Measured on one H200: 95.5 s of wall time per seed, compile and 60 validations
included; at the last step PublicTest accuracy 69.96 and mean class accuracy 66.93 (another run
of seed 0: 70.38 / 67.35); reference 70.89 / 68.50 (the published plain ResNet-18
baseline, epoch chosen on PublicTest). On folders holding only PublicTest (no test split)
evaluate --split validation.
Other seeds: --config.seed=1. Long-tail variants: e.g. --config.loss.name=balanced_softmax.
On a 2-core CPU this recipe takes days: use classifier_synthetic.py there.
"""

from ferjax.kinds import classifier

TRAIN_EXAMPLES = 28709  # FER-2013 Training rows (the prepared `train` split).
BATCH = 256
STEPS_PER_EPOCH = TRAIN_EXAMPLES / BATCH  # 112.1


def get_config():
  config = classifier.default_config()
  config.data.name = "fer2013"
  config.data.image_size = 48
  config.data.channels = 1
  config.data.val_split = "validation"  # PublicTest; the test split is PrivateTest.

  config.model.name = "resnet18"
  config.model.stem = "small"
  config.model.width = 1.0
  config.model.dtype = "bfloat16"

  config.augment.crop = "pad"
  config.augment.crop_padding = 4
  config.augment.flip = True
  config.augment.erasing_prob = 0.5  # torchvision's RandomErasing default probability.
  # Semantic augmentation (on with --config.augment.vaegan_workdir=DIR): residual decoding, the
  # choice made on the synthetic set's validation split (experiments/ablation.py); not tuned here.
  config.augment.decode = "residual"

  config.loss.name = "ce"
  config.loss.label_smoothing = 0.1

  config.optim.name = "sgd"
  config.optim.lr = 0.1
  config.optim.momentum = 0.9
  config.optim.nesterov = True
  config.optim.weight_decay = 5e-4
  config.optim.schedule = "cosine"
  config.optim.warmup_steps = round(2 * STEPS_PER_EPOCH)  # 224

  config.train.batch_size = BATCH
  config.train.num_steps = round(60 * STEPS_PER_EPOCH)  # 6729
  config.train.num_devices = None  # All: batch 256 splits evenly over 1, 2, 4 or 8 GPUs.
  config.train.log_every = 100
  config.train.eval_every = round(STEPS_PER_EPOCH)  # Once per epoch, as the reference.
  config.train.checkpoint_every = 1000
  config.train.keep_checkpoints = 2
  config.train.best_metric = "accuracy"  # The reference picks the epoch by PublicTest accuracy.

  config.eval.batch_size = 512
  config.eval.tta = "flip"
  return config
