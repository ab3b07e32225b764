r"""The class-preserving VAE-GAN on the synthetic faces (the first fix for weak synthetic
faces): vaegan_synthetic.py with class-conditional E and G and a projection discriminator,
optionally judged by a frozen classifier trained on real faces (class-consistency and
perceptual terms).

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

import pathlib

from ferjax import configs


def get_config():
  # vaegan_synthetic.py's settings, read from that file so the two cannot drift apart.
  config = configs.load_config(pathlib.Path(__file__).with_name("vaegan_synthetic.py"))
  config.model.num_classes = 7  # The synthetic set's classes: E, G and D conditional.
  return config
