"""ViT classifier on the synthetic faces, the shape of pretrain_synthetic.py's encoder (SSFER).

  ferjax train --config experiments/configs/classifier_synthetic_vit.py --workdir runs/vit
  ferjax train --config experiments/configs/classifier_synthetic_vit.py --workdir runs/vit_mae \
      --config.model.init_from=runs/mae_synthetic     # stage 1's encoder (ferjax pretrain)
  ferjax evaluate --workdir runs/vit_mae --split test

The recipe of classifier_synthetic.py (32 px gray, flip, no crop, AdamW, batch 64, 1000 steps,
checkpoint chosen on validation) with its ResNet swapped for the ViT that
experiments/configs/pretrain_synthetic.py pre-trains: ViT-Ti at width 0.5 (96 wide, 3 heads),
4 blocks, 4 px patches (64 patches), class-token readout, no input normalisation (as the
pre-training saw its images), so `model.init_from` lays the encoder over it unchanged. Ours, not
tuned: lr 1e-3 with 50 warm-up steps, weight decay 0.05 (the usual ViT value). No layer-wise lr
decay here; fine-tuning the pre-trained encoder MAE's way adds it as an override,
`--config.optim.layer_decay=0.75` (ferjax.kinds.classifier: block j's lr x 0.75^(L - j)).

Used by experiments/ssfer.py (every method, with data.label_fraction). Expected: about 5 min on
a 2-core CPU (estimate: `ferjax bench classifier` measured 0.34 s a train step on a busy CPU,
the ResNet-10 recipe 0.18 s there; with augment.face_mixup_alpha=1.0 0.70 s).
"""

import pathlib

from ferjax import configs


def get_config():
  config = configs.load_config(pathlib.Path(__file__).with_name("classifier_synthetic.py"))
  config.model.update(name="vit_ti", width=0.5, depth=4, patch_size=4, readout="cls",
                      input_norm="none")
  config.optim.update(name="adamw", lr=1e-3, weight_decay=0.05, warmup_steps=50)
  return config
