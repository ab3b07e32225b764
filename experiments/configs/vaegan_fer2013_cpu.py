r"""VAE-GAN on FER-2013 sized for a 2-core CPU: 48 px gray, the CPU classifier recipe's input.

  ferjax train-vaegan --config experiments/configs/vaegan_fer2013_cpu.py \
      --workdir runs/vaegan_fer2013_cpu

The generator that semantic augmentation perturbs in the CPU protocol
(`python experiments/protocol.py --dataset fer2013_cpu ...`). The synthetic set's CPU choices
(vaegan_synthetic.py: lr 2e-3, beta 1e-3, a short KL warm-up), at FER-2013's 48 px (three
stride-2 stages: 48 -> 24 -> 12 -> 6) and one width step up (32-64-128; real faces vary far more
than the synthetic ones). No validation (data.val_split=None): PublicTest is the CPU recipe's
report split and must select nothing, so the protocol samples from the last checkpoint. Not yet run on FER-2013: its time and quality are still to be measured.
"""

from ferjax.kinds import vaegan


def get_config():
  config = vaegan.default_config()
  config.data.name = "fer2013"
  config.data.image_size = 48
  config.data.channels = 1
  config.data.val_split = None  # PublicTest is the report split: it selects nothing here either.

  config.model.latent_dim = 64
  config.model.widths = (32, 64, 128)

  config.loss.beta = 1e-3
  config.loss.kl_warmup_steps = 500

  config.optim.lr = 2e-3
  config.optim.ema_decay = 0.995

  config.train.num_steps = 3000
  config.train.batch_size = 32
  config.train.log_every = 50
  config.train.eval_every = 1000
  config.train.sample_every = 1000
  config.train.checkpoint_every = 1000
  return config
