r"""VAE-GAN smoke run on the synthetic faces: 32 px gray, tiny widths, CPU-sized.

  ferjax train-vaegan --config experiments/configs/vaegan_synthetic_tiny.py \
      --workdir runs/vaegan_synthetic_tiny

Expected: about 70 s on a 2-core CPU (800 steps of 32 images, compile and 4 validations
included). Reconstructions are recognisable (head shape, hair, lighting, mouth: smile, open
mouth, frown; eyes faint) at a validation PSNR of about 24 dB; prior samples are blurry faces.
Settings as in vaegan_synthetic.py (see its docstring for why), on fewer faces and steps.
"""

import pathlib

from ferjax import configs


def get_config():
  # vaegan_synthetic.py on fewer faces and steps.
  config = configs.load_config(pathlib.Path(__file__).with_name("vaegan_synthetic.py"))
  config.data.num_examples = 2000
  config.data.val_examples = 256
  config.loss.kl_warmup_steps = 300
  config.optim.ema_decay = 0.99
  config.train.num_steps = 800
  config.train.eval_every = 200
  config.train.sample_every = 200
  config.train.checkpoint_every = 400
  return config
