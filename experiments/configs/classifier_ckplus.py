"""CK+ (CK+48: 48 px gray, 7 classes with contempt) sized for a CPU: one fold in a few minutes.

  ferjax data prepare ckplus --manual-dir ~/downloads/CK+48                 # once
  ferjax train --config experiments/configs/classifier_ckplus.py --workdir runs/ckplus_f0 \
      --config.data.fold=0
  ferjax evaluate --workdir runs/ckplus_f0 --split test                      # fold0_test
  python experiments/ckplus_cv.py --out runs/ckplus_cv                       # all 10 folds
  python experiments/ckplus_cv.py --out runs/ckplus_cv_ft --init-from runs/fer_cpu

With data.fold=k the run trains on fold<k>_train, holds a subject-grouped 10% of it out for
validation (data.val_split=None: no subject on both sides) and `test` is fold<k>_test; without a
fold it is fold 0. The checkpoint is chosen on mean class accuracy on that hold-out (contempt and
fear have a few dozen images each).

The model is that of classifier_fer2013_cpu.py (ResNet-18, strided stem, width 0.25, per-image
standardisation of the input), so a FER-2013 run can seed it (--config.model.init_from=RUN; the
head is replaced, the classes differ). The recipe: random crop with 4 px reflect padding,
horizontal flip, rotation up to 10 degrees, label smoothing 0.1, AdamW with warm-up and cosine
decay, batch 64, 400 steps (about 30 epochs of a fold's ~880 training images).
Measured on a CK+-sized stand-in (984 random 48 px faces, 123 subjects; no accuracy to report):
3 min 44 s per fold on a 2-core CPU shared with other jobs (load average about 4), compile and 4
validations included; an estimated 2 minutes on an idle one. (Measured with the earlier model,
small stem at width 0.25, whose train step took 2.7x as long as this one's: `ferjax bench`.)
"""

from ferjax.kinds import classifier


def get_config():
  config = classifier.default_config()
  config.data.name = "ckplus"
  config.data.image_size = 48
  config.data.channels = 1
  config.data.val_split = None  # A subject-grouped hold-out of the fold's train split.
  config.data.val_fraction = 0.1
  config.data.fold = None  # 0..9: experiments/ckplus_cv.py sets it per run.

  config.model.name = "resnet18"
  config.model.stem = "strided"
  config.model.width = 0.25
  config.model.input_norm = "per_image"
  config.model.dtype = "float32"

  config.augment.crop = "pad"
  config.augment.crop_padding = 4
  config.augment.flip = True
  config.augment.rotation_deg = 10.0

  config.loss.name = "ce"
  config.loss.label_smoothing = 0.1

  config.optim.name = "adamw"
  config.optim.lr = 3e-3
  config.optim.weight_decay = 1e-4
  config.optim.schedule = "cosine"
  config.optim.warmup_steps = 40

  config.train.batch_size = 64
  config.train.num_steps = 400
  config.train.num_devices = 1  # Fake multi-device CPUs only add overhead.
  config.train.log_every = 50
  config.train.eval_every = 100
  config.train.checkpoint_every = 100
  config.train.keep_checkpoints = 2
  config.train.best_metric = "mean_class_accuracy"

  config.eval.batch_size = 256
  config.eval.tta = "none"
  return config
