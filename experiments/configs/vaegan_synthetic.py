r"""VAE-GAN on the synthetic faces, demo-sized: 32 px gray, the demo classifier's resolution.

  ferjax train-vaegan --config experiments/configs/vaegan_synthetic.py \
      --workdir runs/vaegan_synthetic

Expected: about 2-3 minutes on a 2-core CPU (part of the 10-minute `ferjax demo`; 1500 steps of
32 images, compile and 3 validations included). Reconstructions keep each face's head shape,
hair, lighting and mouth (smile, open mouth, frown); validation PSNR about 25 dB; prior samples
are blurry faces. The semantic-augmentation sampler then perturbs these latents.

CPU choices (ours, measured on the synthetic set): lr 2e-3 (10x the usual GAN rate; stable over
these short runs, 2x faster progress than 1e-3), beta 1e-3 (0.01 blurred the reconstructions
badly), widths 16-32-64 (32-64-128 is 2.3x slower per step for +0.3 dB).
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
