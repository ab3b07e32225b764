r"""VAE-GAN on FER-2013, the full accelerator run: DCGAN-64 layout, 64 px gray, bfloat16.

  ferjax train-vaegan --config experiments/configs/vaegan_fer2013.py \
      --workdir runs/vaegan_fer2013 --config.data.manual_dir=/path/to/fer2013

`data.manual_dir` holds the Kaggle folders (train/<class>/*.jpg, test/<class>/*.jpg) or
fer2013.csv; the dataset is prepared on first use. Validation is the PublicTest part (CSV rows,
or the test/ files named PublicTest_*; with folders that lack those names, add
--config.data.val_split=None). The test split (PrivateTest) is never loaded.

Expected run time: about 7 minutes on one H200 (30k steps of 256 images, ~270 epochs; 8,000
steps measured 109 s). On a 2-core CPU one step takes seconds: not meant to run there.
"""

from ferjax.kinds import vaegan


def get_config():
  config = vaegan.default_config()
  config.data.name = "fer2013"
  config.data.image_size = 64  # FER-2013's 48 px faces upsampled to the DCGAN-64 layout.
  config.data.channels = 1
  config.data.manual_dir = None  # Set on the command line (see above).

  config.model.arch = "dcgan"
  config.model.latent_dim = 128
  config.model.widths = (64, 128, 256, 512)
  config.model.dtype = "bfloat16"

  config.loss.beta = 1e-3
  config.loss.kl_warmup_steps = 5000

  config.optim.lr = 2e-4
  config.optim.ema_decay = 0.999

  config.train.num_steps = 30000
  config.train.batch_size = 256
  config.train.log_every = 200
  config.train.eval_every = 2500
  config.train.sample_every = 2500
  config.train.checkpoint_every = 2500
  return config
