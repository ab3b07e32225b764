"""SSFER stage 3 with the ViT of classifier_synthetic_vit.py: FixMatch + EMA teacher.

  ferjax train-semisup --config experiments/configs/semisup_synthetic_vit.py \
      --workdir runs/semisup_vit --config.model.init_from=runs/vit_mae_mixup
  ferjax evaluate --workdir runs/semisup_vit --split test

classifier_synthetic_vit.py's recipe (the shape of pretrain_synthetic.py's encoder) with the
`semisup` settings of semisup_synthetic.py (10% of train labelled, 3 x 64 unlabeled images a
step, confidence 0.7, RandAugment 2 ops at magnitude up to 10, teacher EMA 0.999).
`model.init_from` takes a pretrain workdir or a finished classifier workdir of the same shape
(experiments/ssfer.py passes its mae_mixup run). Expected: roughly 3x the supervised recipe's
time per step on a 2-core CPU (not measured to the second).
"""

import pathlib

from ferjax import configs
from ferjax.kinds import semisup


def get_config():
  config = semisup.default_config()
  recipe = configs.load_config(pathlib.Path(__file__).with_name("classifier_synthetic_vit.py"))
  config.update_from_flattened_dict(configs.flatten(configs.to_dict(recipe)))
  stage3 = configs.load_config(pathlib.Path(__file__).with_name("semisup_synthetic.py"))
  config.data.label_fraction = stage3.data.label_fraction
  config.semisup.update(stage3.semisup.to_dict())
  return config
