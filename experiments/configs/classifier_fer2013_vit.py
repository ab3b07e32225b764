"""FER-2013 ViT classifier, the shape of pretrain_fer2013.py's encoder (SSFER; GPU).

  ferjax train --config experiments/configs/classifier_fer2013_vit.py --workdir runs/fer_vit \
      --config.model.init_from=runs/mae_fer2013          # stage 1 (ferjax pretrain)
  ferjax evaluate --workdir runs/fer_vit --split test --tta flip

classifier_fer2013.py's data, augmentation (pad-crop, flip, random erasing), label smoothing,
batch 256, 60 epochs, checkpoint chosen on PublicTest, with its ResNet-18 swapped for the ViT
that experiments/configs/pretrain_fer2013.py pre-trains: ViT-S (384 wide, 12 blocks, 6 heads),
4 px patches on 48 px gray (144 patches), class-token readout, no input normalisation, bfloat16
compute, so `model.init_from` lays the encoder over it unchanged. SGD at lr 0.1 does not suit a
ViT: AdamW at lr 5e-4 (MAE fine-tuning's 1e-3 x 256 / 512, no layer decay here), weight decay
0.05, 5 warm-up epochs, cosine decay (ours, not tuned). Used by experiments/ssfer.py.
Layer-wise lr decay is off (optim.layer_decay=1.0); MAE's fine-tuning recipe is the override
`--config.optim.layer_decay=0.75` (ViT-S; MAE used 0.65 for ViT-B).

Expected run time: not measured (no accelerator during development); the ResNet-18 recipe takes
95 s on one H200, a ViT-S at 144 tokens more. Not meant for a CPU.
"""

import pathlib

from ferjax import configs

STEPS_PER_EPOCH = 28709 / 256  # FER-2013 Training rows / batch, as classifier_fer2013.py.


def get_config():
  config = configs.load_config(pathlib.Path(__file__).with_name("classifier_fer2013.py"))
  config.model.update(name="vit_s", width=1.0, depth=None, patch_size=4, readout="cls",
                      input_norm="none", dtype="bfloat16")
  config.optim.update(name="adamw", lr=5e-4, weight_decay=0.05, nesterov=False,
                      warmup_steps=round(5 * STEPS_PER_EPOCH))
  return config
