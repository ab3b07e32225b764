"""Semi-supervised classifier on the synthetic faces (SSFER stage 3): FixMatch with an EMA teacher.

  ferjax train-semisup --config experiments/configs/semisup_synthetic.py --workdir runs/semisup
  ferjax evaluate --workdir runs/semisup --split test

  # FlexMatch's per-class thresholds instead of one:
  ferjax train-semisup --config experiments/configs/semisup_synthetic.py \
      --workdir runs/semisup_flex --config.semisup.threshold_mode=flexmatch
  # From an MAE-pretrained ViT (experiments/configs/pretrain_synthetic.py, same ViT shape):
  ferjax train-semisup --config experiments/configs/semisup_synthetic.py \
      --workdir runs/semisup_vit --config.model.name=vit_ti --config.model.stem=small \
      --config.model.init_from=runs/mae  (plus that run's model.width / depth / patch_size)

The classifier recipe of classifier_synthetic.py (ResNet-10 at width 0.25, 32 px gray, AdamW,
flip, per-image standardisation) with 10% of train labelled (data.label_fraction, stratified and
seeded: the same subset as a supervised run at this fraction, which is the baseline to beat:
`ferjax train --config experiments/configs/classifier_synthetic.py
--config.data.label_fraction=0.1`). The other 90% is the unlabeled pool; each step also draws 3 x
64 of its images (semisup.ratio; FixMatch's 7 is too slow on CPU), pseudo-labelled by the EMA
teacher at confidence 0.7 and learned on their RandAugment views.

Expected: roughly 3x the supervised recipe's time per step on a 2-core CPU (about 7-8 min for
1000 steps; not measured to the second). metrics.jsonl logs mask_rate (share of the unlabeled
batch above threshold), pseudo_label_accuracy and per-class pseudo_count / pseudo_accuracy (the
pool's hidden labels, for diagnosis only).
"""

import pathlib

from ferjax import configs
from ferjax.kinds import semisup


def get_config():
  config = semisup.default_config()
  recipe = configs.load_config(pathlib.Path(__file__).with_name("classifier_synthetic.py"))
  config.update_from_flattened_dict(configs.flatten(configs.to_dict(recipe)))
  config.data.label_fraction = 0.1
  config.semisup.update(threshold=0.7, unlabeled_weight=1.0, ratio=3, ema_decay=0.999,
                        threshold_mode="fixed", randaugment_ops=2, randaugment_magnitude=10.0)
  return config
