"""Classifier smoke run on the synthetic faces: ResNet-10 at width 0.25, 32 px gray, CPU-sized.

  ferjax train --config experiments/configs/classifier_synthetic_tiny.py --workdir runs/clf_tiny
  ferjax evaluate --workdir runs/clf_tiny --split test

Expected: under 1 minute on a 2-core CPU (300 steps of 64 images; data generation, compile and
3 validations included: 52 s measured); validation and test mean class accuracy about 0.4
(chance: 1/7), with the rare classes (angry, fear) near zero recall: the plain baseline that
the long-tail methods are measured against.

The recipe of classifier_synthetic.py (see its docstring for the choices), on fewer steps.
"""

import pathlib

from ferjax import configs


def get_config():
  # The demo recipe (classifier_synthetic.py), shortened.
  config = configs.load_config(pathlib.Path(__file__).with_name("classifier_synthetic.py"))
  config.optim.warmup_steps = 20
  config.train.num_steps = 300
  config.train.log_every = 25
  config.train.eval_every = 100
  config.train.checkpoint_every = 100
  return config
