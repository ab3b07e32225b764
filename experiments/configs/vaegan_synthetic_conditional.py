r"""The class-preserving VAE-GAN on the synthetic faces (issue 19, cause 1): vaegan_synthetic.py
with class-conditional E and G and a projection discriminator, optionally judged by a frozen
classifier trained on real faces (class-consistency and perceptual terms).

  ferjax train-vaegan --config experiments/configs/vaegan_synthetic_conditional.py \
      --workdir runs/vaegan_synthetic_conditional
  ferjax train-vaegan --config experiments/configs/vaegan_synthetic_conditional.py \
      --workdir runs/vaegan_synthetic_judged --config.loss.classifier_workdir=RUN \
      --config.loss.class_consistency_weight=0.1 --config.loss.perceptual_weight=0.1

RUN: a finished `ferjax train` run on the real synthetic faces (e.g. the protocol's none_seed0);
judge the result with a *different* one (`ferjax evaluate-synthetic --classifier`), since G has
learned to please the one it was trained against. Same size and time as vaegan_synthetic.py
(about 2-3 minutes on a 2-core CPU, a little more with the judge).
"""

from ferjax.kinds import vaegan


def get_config():
  config = vaegan.default_config()
  config.data.name = "synthetic"
  config.data.image_size = 32  # 3 stride-2 stages: 32 -> 16 -> 8 -> 4.
  config.data.channels = 1
  config.data.num_examples = None  # The whole train split (7000 faces).
  config.data.val_examples = 512

  config.model.latent_dim = 32
  config.model.widths = (16, 32, 64)
  config.model.num_classes = 7  # The synthetic set's classes: E, G and D conditional.

  config.loss.beta = 1e-3
  config.loss.kl_warmup_steps = 500

  config.optim.lr = 2e-3
  config.optim.ema_decay = 0.995

  config.train.num_steps = 1500
  config.train.batch_size = 32
  config.train.log_every = 50
  config.train.eval_every = 500
  config.train.sample_every = 500
  config.train.checkpoint_every = 500
  return config
