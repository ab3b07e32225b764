"""SSFER stage 3 on FER-2013 with classifier_fer2013_vit.py's ViT: FixMatch + EMA teacher (GPU).

  ferjax train-semisup --config experiments/configs/semisup_fer2013_vit.py \
      --workdir runs/fer_semisup --config.data.label_fraction=0.1 \
      --config.model.init_from=runs/fer_vit_mae_mixup
  ferjax evaluate --workdir runs/fer_semisup --split test --tta flip

classifier_fer2013_vit.py's recipe (the shape of pretrain_fer2013.py's encoder) with 10% of
train labelled and the rest the unlabeled pool; the `semisup` settings of semisup_synthetic.py
(3 x 256 unlabeled images a step, confidence 0.7, RandAugment 2 ops at magnitude up to 10,
teacher EMA 0.999; ours, not tuned on FER-2013). experiments/ssfer.py passes the fraction and its
mae_mixup run. Expected run time: not measured (no accelerator during development); roughly 3x
the supervised recipe's per step.
"""

import pathlib

from ferjax import configs
from ferjax.kinds import semisup


def get_config():
  config = semisup.default_config()
  recipe = configs.load_config(pathlib.Path(__file__).with_name("classifier_fer2013_vit.py"))
  config.update_from_flattened_dict(configs.flatten(configs.to_dict(recipe)))
  stage3 = configs.load_config(pathlib.Path(__file__).with_name("semisup_synthetic.py"))
  config.data.label_fraction = stage3.data.label_fraction
  config.semisup.update(stage3.semisup.to_dict())
  return config
