"""What a head-retraining run is (`ferjax retrain-head`): its config (defaults and rules
together), the head's parameters and optimizer, its train state and random streams, and the
classifier run it writes. The stage itself is ferjax.train.retrain_head; its feature-space
synthesis is ferjax.augment.feature_synthesis.

A head-retraining run takes a finished classifier run, freezes its backbone, and trains only the
final Dense layer (`head`) on the backbone's penultimate features: classifier re-training
(cRT, Kang et al. 2020, "Decoupling representation and classifier"), optionally with synthetic
minority-class features made by perturbing the latents of a small VAE trained on those features
(`synth.mode=feature`), or with the features of synthetic minority-class faces made beforehand by
a trained VAE-GAN (`synth.mode=pixel`, the decoupled use of pixel-space synthesis: the faces
reach only the head, never the representation). Its output is a regular classifier workdir (the
source backbone, the new head).

Pixel mode: before training, `synth.pool_per_class` faces are synthesized for each class the
plan synthesizes (ferjax.augment.synthesis.synthesize_per_class with the `synth.vaegan_workdir`
run at `synth.vaegan_checkpoint`, `synth.perturb`, `synth.alpha`, `synth.decode`, in the
classifier's image format) and passed through the frozen backbone exactly as the real train
images are (eval mode; mirrored too with head.flip). The batches follow the same plan as the
feature mode (ferjax.augment.feature_synthesis.plan: synth.target, fill, tail_only, max_share,
weight); each synthetic slot takes a random feature of its class's synthetic pool. No feature VAE is
trained (synth.vae is not read).

    ferjax retrain-head --workdir runs/baseline --out runs/baseline_pix \
        --config.synth.mode=pixel --config.synth.vaegan_workdir=runs/vaegan \
        --config.synth.decode=residual --config.head.loss=logit_adjusted \
        --config.head.sampler=instance

Defaults are ours unless a field's doc names a source. cRT re-trains the head with class-balanced
sampling and a cosine schedule (Kang et al.: 10 epochs, lr 0.2 at batch 512; here lr 0.1 at
batch 256, SGD with momentum 0.9).

Weight balancing (Alshammari et al. 2022, "Long-tailed recognition via weight balancing",
CVPR; their code's `MaxNorm_via_PGD`): stage 1 learns the whole network with a tuned, larger
weight decay; stage 2 re-trains the classifier, class-balanced, under a per-class MaxNorm
constraint by projected gradient descent. As in their code, the radius is relative: with
threshold t (`head.max_norm_thresh`), r = min_k ||w_k|| + t (max_k ||w_k|| - min_k ||w_k||) over
the class weight vectors (the kernel columns [D]) of the head stage 2 starts from, so t = 0
clips every class to the smallest norm and t = 1 clips none at the start; every
`head.max_norm_every` steps (by default one epoch of the train images, their code's once per
epoch) and after the last step each column is projected onto the L2 ball of radius r,
w_k <- w_k / max(1, ||w_k|| / r); the bias is not constrained. `head.max_norm_radius` instead
takes r as an absolute radius (ours). The paper balances stage 2 with a class-balanced loss;
here class-balanced sampling does it (the same expected gradient for cross-entropy). Here:

    ferjax train --config experiments/configs/classifier_fer2013.py --workdir runs/wb \\
        --config.optim.weight_decay=5e-3
    ferjax retrain-head --workdir runs/wb --out runs/wb_maxnorm \\
        --config.head.max_norm_thresh=0.1 --config.head.sampler=class_balanced

Both the weight decay and the threshold are to be tuned on validation (their code's thresholds
are 0.1 in their stage-2 demo and 1.0 by default). Neither field set, the default, is plain cRT.
"""

import json
import pathlib
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ferjax import configs, writing
from ferjax.configs import check, checkpoint, flag, integer, number, one_of, text
from ferjax.core import checkpoint as checkpoint_lib
from ferjax.data import pipeline
from ferjax.kinds import classifier
from ferjax.kinds.classifier import BEST_METRICS  # The head selects as the classifier does.

KIND = "retrain-head"  # The stage's own name (its command, head.json, run.json's stage);
# the workdir it writes is a classifier's.
SAMPLERS = ("instance", "class_balanced", "sqrt")  # fixed-distribution policies of data.pipeline
LOSSES = ("ce", "logit_adjusted")
INITS = ("source", "zero")
SYNTH_MODES = ("none", "feature", "pixel")
# ferjax.augment.semantic.MODES and the fixed targets of semantic.TARGETS (kinds sit below
# augment, so they are written here; tests/test_retrain_head.py checks that they agree).
PERTURBATIONS = ("posterior", "interpolate", "class_gaussian")
TARGETS = ("uniform", "sqrt", "largest")
DECODES = ("full", "residual")


# =================================================================================================
# Config: every field the stage reads, its default and what a valid value is
# =================================================================================================
SPEC = {
    "seed": integer(0, 0, doc="Seed of the feature VAE, the batches and the synthetic features "
                    "and faces."),
    "source": {
        "checkpoint": checkpoint(doc="The source run's checkpoint whose backbone is kept (best: "
                                 "chosen on validation)."),
    },
    "head": {
        "sampler": one_of("class_balanced", SAMPLERS, doc="Which real features a batch draws "
                          "(cRT: class_balanced; weight balancing's stage 2 too)."),
        "loss": one_of("ce", LOSSES, doc="Loss of the head: ce or logit_adjusted (by the class "
                       "prior of the batches, real and synthetic)."),
        "tau": number(1.0, 0, doc="head.loss=logit_adjusted: tau in CE(z + tau * log prior)."),
        "init": one_of("source", INITS, doc="Start from the source run's head or from zeros."),
        "flip": flag(True, doc="Also use the features of the mirrored train images (doubles "
                     "the pool; the classifier trained with flips)."),
        "lr": number(0.1, 0, lo_open=True, doc="Peak of the cosine learning-rate schedule (to 0 "
                     "at head.steps), SGD."),
        "momentum": number(0.9, 0, 1, hi_open=True, doc="SGD momentum."),
        "weight_decay": number(5e-4, 0, doc="Weight decay, on the kernel only."),
        "max_norm_thresh": number(None, 0, optional=True,
                                  doc="Weight balancing's MaxNorm (Alshammari et al. 2022, "
                                  "relative as their code): the class columns are held in the "
                                  "L2 ball of radius min + t (max - min) of their norms at the "
                                  "start; None: off."),
        "max_norm_radius": number(None, 0, lo_open=True, optional=True,
                                  doc="MaxNorm with this absolute radius instead (ours); "
                                  "None: off."),
        "max_norm_every": integer(None, 1, optional=True,
                                  doc="Steps between MaxNorm projections (and after the last); "
                                  "None: one epoch of the train images (their code's)."),
        "steps": integer(1000, 1, doc="Training steps of the head."),
        "batch_size": integer(256, 1, doc="Batch size of the head's training."),
        "eval_every": integer(100, 1, doc="Steps between validations (and the last step); the "
                              "best head is kept."),
        "best_metric": one_of("mean_class_accuracy", BEST_METRICS,
                              doc="Validation metric (on the source run's validation set) that "
                              "chooses the best head."),
    },
    "synth": {
        "mode": one_of("none", SYNTH_MODES,
                       doc="Synthetic minority-class features: none, feature (perturbed latents "
                       "of a feature VAE) or pixel (the features of faces synthesized by the "
                       "synth.vaegan_workdir VAE-GAN)."),
        "vae": {  # The feature VAE (ferjax.models.feature_vae), trained on the train features.
            "latent_dim": integer(32, 1, doc="synth.mode=feature: the feature VAE's latent "
                                  "width."),
            "hidden": integer(256, 1, doc="synth.mode=feature: the feature VAE's hidden width."),
            "steps": integer(2000, 1, doc="synth.mode=feature: the feature VAE's training "
                             "steps."),
            "lr": number(1e-3, 0, lo_open=True, doc="synth.mode=feature: the feature VAE's Adam "
                         "learning rate."),
            "batch_size": integer(256, 1, doc="synth.mode=feature: the feature VAE's batch "
                                  "size."),
            "kl_weight": number(1.0, 0, doc="synth.mode=feature: beta, the feature VAE's KL "
                                "weight."),
        },
        "perturb": one_of("posterior", PERTURBATIONS, doc="Latent perturbation, as the "
                          "classifier's augment.mode: posterior, interpolate or class_gaussian."),
        "alpha": number(1.0, 0, doc="The perturbation's scale."),
        "target": one_of("largest", TARGETS, doc="The per-class counts synthesis fills towards: "
                         "uniform (the mean count), sqrt or largest (the largest class's)."),
        "fill": number(1.0, 0, 1, doc="Share of each class's gap (target - real count) "
                       "synthesized."),
        "tail_only": flag(True, doc="Synthesize only for the classes below the median train "
                          "count."),
        "max_share": number(0.5, 0, 1, hi_open=True, doc="Cap on the share of a batch's slots "
                            "that are synthetic."),
        "weight": number(1.0, 0, doc="Loss weight of a synthetic feature."),
        "decode": one_of("full", DECODES,
                         doc="full: the decoding D(z'); residual: seed + D(z') - D(mu), the "
                         "perturbation's change added to the real seed (pixel mode: to the "
                         "face, in pixels), as the classifier's augment.decode."),
        "vaegan_workdir": text(None, doc="synth.mode=pixel (and only then): the `ferjax "
                               "train-vaegan` workdir whose VAE-GAN makes the faces."),
        "vaegan_checkpoint": checkpoint(doc="synth.mode=pixel: the VAE-GAN run's checkpoint, as "
                                        "the classifier's augment.vaegan_checkpoint."),
        "pool_per_class": integer(500, 1, doc="synth.mode=pixel: faces made per synthesized "
                                  "class (their features, and their mirrors' with head.flip, "
                                  "are the pool the synthetic slots draw from)."),
    },
}


def default_config() -> ml_collections.ConfigDict:
  """Every field the stage reads, with defaults, locked (a misspelled field is an error)."""
  return configs.from_spec(SPEC)


def validate_config(config) -> None:
  """Field rules (SPEC), then the rules that tie fields together; a UserError names the field."""
  configs.check_spec(config, SPEC)
  h = config.head
  if h.max_norm_thresh is not None:
    check(h.max_norm_radius is None, "head.max_norm_radius", "None with head.max_norm_thresh "
          "(one MaxNorm rule: relative or absolute)", h.max_norm_radius)
    check(h.init == "source", "head.init", "source with head.max_norm_thresh (its radius is "
          "relative to the starting head's class norms, all 0 from zeros)", h.init)
  s = config.synth
  if s.mode != "none":
    check(s.fill > 0, "synth.fill", f"a share > 0 with synth.mode={s.mode} (0 synthesizes "
          "nothing; use synth.mode=none)", s.fill)
    check(s.max_share > 0, "synth.max_share", f"a share > 0 with synth.mode={s.mode} (0 leaves "
          "no synthetic slot; use synth.mode=none)", s.max_share)
  if s.mode == "pixel":
    check(bool(s.vaegan_workdir), "synth.vaegan_workdir", "a `ferjax train-vaegan` workdir with "
          "synth.mode=pixel (its VAE-GAN makes the synthetic faces)", s.vaegan_workdir)
  else:
    check(not s.vaegan_workdir, "synth.vaegan_workdir", "None: it is only read with "
          f"synth.mode=pixel (synth.mode is {s.mode!r})", s.vaegan_workdir)


# =================================================================================================
# Class distributions
# =================================================================================================
def sampled_probs(sampler: str, train_counts) -> np.ndarray:
  """Class distribution [K] of the real features a batch draws (float64)."""
  return np.asarray(pipeline.sampler_class_probs(sampler, np.asarray(train_counts)), np.float64)


# =================================================================================================
# The head, its optimizer, train state and random streams
# =================================================================================================
def initial_head(config, source_head: dict) -> dict:
  """The head to start from: the source run's ({"kernel" [D, K], "bias" [K]}), or zeros."""
  head = {k: jnp.asarray(v, jnp.float32) for k, v in source_head.items()}
  if config.head.init == "zero":
    head = jax.tree.map(jnp.zeros_like, head)
  return head


def apply_head(head: dict, features):
  """Logits [B, K] of features [B, D] (the ResNet's final Dense, in float32)."""
  return features @ head["kernel"] + head["bias"]


class MaxNorm(NamedTuple):
  """Weight balancing's MaxNorm as the train step applies it: the radius, steps between
  projections."""
  radius: float
  every: int


def max_norm(config, head: dict, train_examples: int) -> MaxNorm | None:
  """The MaxNorm of `config.head` for a stage starting from `head` ({"kernel" [D, K], ...}) on
  `train_examples` train images; None when neither head.max_norm_thresh nor
  head.max_norm_radius is set. The relative radius is min + t (max - min) of the kernel's class
  column norms (`MaxNorm_via_PGD.setPerLayerThresh`, L2); the default interval is one epoch,
  ceil(train_examples / head.batch_size) steps."""
  h = config.head
  if h.max_norm_thresh is None and h.max_norm_radius is None:
    return None
  every = h.max_norm_every or -(-train_examples // h.batch_size)
  if h.max_norm_radius is not None:
    return MaxNorm(float(h.max_norm_radius), int(every))
  norms = np.linalg.norm(np.asarray(head["kernel"], np.float64), axis=0)
  radius = norms.min() + h.max_norm_thresh * (norms.max() - norms.min())
  return MaxNorm(float(radius), int(every))


def project_max_norm(head: dict, radius: float | None) -> dict:
  """`head` with each class's kernel column (kernel [D, K], column k: class k) longer than
  `radius` scaled onto the L2 ball of that radius, w_k * radius / ||w_k||, the PGD step of
  weight balancing's MaxNorm (Alshammari et al. 2022, `MaxNorm_via_PGD.PGD`, L2, tau 1,
  classifier weights only; the bias is unchanged). `radius` None: `head` unchanged. Pure,
  jit-friendly."""
  if radius is None:
    return head
  kernel = head["kernel"]
  norms = jnp.sqrt(jnp.sum(jnp.square(kernel), axis=0, keepdims=True))  # [1, K]
  scale = jnp.where(norms > radius, radius / jnp.where(norms > 0, norms, 1.0), 1.0)
  return {**head, "kernel": kernel * scale}


def make_optimizer(config):
  """(optax transform, learning-rate schedule): SGD with momentum, cosine to 0 at head.steps,
  weight decay on the kernel only."""
  h = config.head
  schedule = optax.cosine_decay_schedule(h.lr, h.steps)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  tx = optax.chain(optax.add_decayed_weights(h.weight_decay, decay_mask),
                   optax.sgd(schedule, momentum=h.momentum or None))
  return tx, schedule


@flax.struct.dataclass
class HeadState:
  step: jax.Array
  params: Any  # {"kernel", "bias"}
  opt_state: Any


def init_state(config, source_head: dict, tx) -> HeadState:
  params = initial_head(config, source_head)
  return HeadState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


class RngStreams(NamedTuple):
  vae_init: jax.Array   # the feature VAE's parameters
  vae_train: jax.Array  # its batches and reparameterisation noise: fold_in(vae_train, step)
  train: jax.Array      # the head's batches and synthetic features: fold_in(train, step)
  report: jax.Array     # the synthetic features of the nearest-neighbour picture


def rng_streams(seed: int) -> RngStreams:
  base = jax.random.key(seed)
  return RngStreams(*(jax.random.fold_in(base, i) for i in range(1, 5)))


# --- The output: a classifier run with the source backbone and the new head -----------------------
def classifier_state(run, head: dict, step: int, tx) -> classifier.TrainState:
  """The classifier train state of the source's evaluation weights with `head`, a fresh
  optimizer state of `tx` (the source config's optimizer), at `step`, replicated over the run's
  mesh (what open_classifier restores)."""
  variables = {"params": {**run.variables["params"], "head": jax.tree.map(jnp.asarray, head)},
               "batch_stats": run.variables["batch_stats"]}
  ema = run.config.optim.ema_decay > 0  # with_weights reads only the step and whether EMA.
  template = classifier.TrainState(
      step=jnp.asarray(step, jnp.int32), params=None, batch_stats=None, opt_state=None,
      ema_params={} if ema else None, ema_batch_stats={} if ema else None)
  return classifier.with_weights(template, variables, tx, run.mesh)


def write_classifier_run(folder: pathlib.Path, run, best, last, meta: dict, *,
                         best_metric: str) -> None:
  """run.json, config.json and checkpoints/ (best, then last) of the new classifier run."""
  record = {"kind": classifier.KIND, "stage": KIND,
            "source": meta["source"]["workdir"]}
  writing.write_atomic(folder / "run.json", json.dumps(record, indent=2) + "\n")
  configs.save_config(run.config, folder / "config.json")
  tx, _ = classifier.make_optimizer(run.config)
  best_state = classifier_state(run, best[1], best[0], tx)
  last_state = best_state if last[0] == best[0] else classifier_state(run, last[1], last[0], tx)
  with checkpoint_lib.Checkpoints(folder / "checkpoints", max_to_keep=1,
                                  best_metric=best_metric) as ckpt:
    ckpt.save(best[0], best_state, metrics=best[2], extra=meta, last=False)
    ckpt.save(last[0], last_state, metrics=last[2], extra=meta)
