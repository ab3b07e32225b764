"""What a semi-supervised run is (stage 3 of SSFER): FixMatch with an EMA teacher, optionally with
FlexMatch's per-class thresholds. Its config is the classifier's (ferjax.kinds.classifier: data,
model, optim, loss, sampler, augment, train, eval) plus a `semisup` group; its model is the
classifier's; its train state holds the student, the teacher (an exponential moving average of
the student) and FlexMatch's per-example record. The trainer (ferjax.train.semisup) and
ferjax.runs (which opens a finished run as a classifier, with the teacher's weights) build on
this module, never on the trainer.
"""

import copy
import pathlib
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections

from ferjax import configs
from ferjax.configs import check, integer, number, one_of, text
from ferjax.core import parallel
from ferjax.data import unlabeled
from ferjax.kinds import classifier

KIND = "semisup"
THRESHOLD_MODES = ("fixed", "flexmatch")
BEST_METRICS = classifier.BEST_METRICS

# =================================================================================================
# Config: the classifier's fields plus `semisup`
# =================================================================================================
SPEC = copy.deepcopy(classifier.SPEC)
SPEC["semisup"] = {
    "threshold": number(0.7, 0, 1, lo_open=True,
                        doc="FixMatch: the teacher confidence a pseudo-label needs to count "
                        "(FixMatch: 0.95; SSFER and ferjax 0.7, as a 7-class FER model is rarely "
                        "that sure early on); flexmatch: the ceiling of the per-class thresholds."),
    "unlabeled_weight": number(1.0, 0, doc="lambda_u in the loss sup + lambda_u * unlabeled."),
    "ratio": integer(3, 1, doc="Unlabeled batch size over train.batch_size (FixMatch: 7; ours 3, "
                     "as each unlabeled image costs two forward passes and a backward one)."),
    "ema_decay": number(0.999, 0, 1, hi_open=True,
                        doc="The EMA teacher's decay, warmed up as min(ema_decay, (1 + step) / "
                        "(10 + step)) so that a short run's teacher is not its random "
                        "initialisation."),
    "threshold_mode": one_of("fixed", THRESHOLD_MODES,
                             doc="fixed: max probability >= semisup.threshold; flexmatch: a "
                             "per-class threshold from the pool's record of confident "
                             "predictions (FlexMatch, Zhang et al. 2021)."),
    "randaugment_ops": integer(2, 1, 8, doc="RandAugment operations per strong view."),
    "randaugment_magnitude": number(10.0, 0, 10, doc="RandAugment: magnitudes are drawn from "
                                    "[0, this]."),
    "extra_sources": text("", optional=False,
                          doc="More unlabeled images joined to the pool, as pretrain's "
                          "data.sources (e.g. `folder:/faces,affectnet:2`; a named dataset's "
                          "test split is never read); `''`: none."),
}


def default_config() -> ml_collections.ConfigDict:
  """Every field the trainer reads, with defaults, locked (as the classifier's); a run sets
  data.label_fraction (< 1), which leaves the rest of train as the unlabeled pool."""
  return configs.from_spec(SPEC)


def validate_config(config) -> None:
  """The classifier's rules (the `semisup` group aside), then this kind's."""
  configs.check_spec(config, SPEC)
  fields = configs.to_dict(config)
  del fields["semisup"]
  classifier.validate_config(ml_collections.ConfigDict(fields))
  d, s, m, a, l = config.data, config.semisup, config.model, config.augment, config.loss
  check(d.label_fraction is not None and d.label_fraction < 1, "data.label_fraction",
        "a fraction < 1 (the rest of train is the unlabeled pool): a semi-supervised run with "
        "no unlabeled pool left", d.label_fraction)
  check(d.name != "joint", "data.name", "a single dataset (joint training has no unlabeled "
        "pool here)", d.name)
  check(config.optim.ema_decay == 0, "optim.ema_decay", "0 (the teacher is the EMA here: set "
        "semisup.ema_decay)", config.optim.ema_decay)
  check(m.head in ("linear", "cosine"), "model.head", "linear or cosine in a semi-supervised run",
        m.head)
  check(l.eac_weight == 0, "loss.eac_weight", "0 in a semi-supervised run", l.eac_weight)
  for field in ("mixup_alpha", "face_mixup_alpha"):  # The labelled batch is not mixed here.
    check(a.get(field, 0) == 0, f"augment.{field}", "0 in a semi-supervised run", a.get(field))
  check(not a.vaegan_workdir, "augment.vaegan_workdir", "'' in a semi-supervised run",
        a.vaegan_workdir)
  if s.extra_sources:
    sources = unlabeled.parse_sources(s.extra_sources, "semisup.extra_sources")
    same = [str(x) for x in sources if x.name == d.name]
    check(not same, "semisup.extra_sources", f"sources other than data.name ({d.name}: its "
          "validation images would join the pool)", s.extra_sources)


def read_config(workdir) -> ml_collections.ConfigDict:
  """A finished (or started) run's config.json laid over the defaults."""
  return configs.read_saved(default_config(), pathlib.Path(workdir) / "config.json",
                            "ferjax train-semisup")


def extra_sources_data(config):
  """The fields `unlabeled.read_source` reads, from a semi-supervised config."""
  d = config.data
  return ml_collections.ConfigDict({
      "image_size": d.image_size, "channels": d.channels, "num_examples": d.num_examples,
      "data_dir": d.data_dir, "manual_dir": d.manual_dir, "include_test": False,
      "include_validation": True})


# =================================================================================================
# Model, optimizer, train state: the classifier's, plus the teacher and the FlexMatch record
# =================================================================================================
build_model = classifier.build_model
make_optimizer = classifier.make_optimizer
rng_streams = classifier.rng_streams
sampled_counts = classifier.sampled_counts


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any           # the student
  batch_stats: Any
  opt_state: Any
  teacher_params: Any   # EMA of the student: pseudo-labels, validation, evaluation
  teacher_batch_stats: Any
  # FlexMatch: the class of each pool image's last confident teacher prediction (-1: none yet);
  # int32 [pool size] (kept, and unused, in fixed mode).
  pseudo_record: jax.Array


def _init_fn(config, model, tx, pool_size: int):
  def init():
    shape = (1, config.data.image_size, config.data.image_size, config.data.channels)
    variables = model.init(rng_streams(config.seed).init, jnp.zeros(shape, jnp.float32),
                           train=False)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=tx.init(params), teacher_params=params,
                      teacher_batch_stats=batch_stats,
                      pseudo_record=jnp.full((pool_size,), -1, jnp.int32))
  return init


def init_state(config, model, tx, mesh, pool_size: int) -> TrainState:
  """Parameters created inside jit, directly replicated over the mesh."""
  return parallel.init_replicated(_init_fn(config, model, tx, pool_size), mesh,
                                  fast_compile=False)


def abstract_state(config, model, mesh, pool_size: int, tx=None) -> TrainState:
  """Shapes, dtypes and shardings of the train state, without computing it (for restoring)."""
  tx = tx or make_optimizer(config)[0]
  return parallel.abstract_replicated(_init_fn(config, model, tx, pool_size), mesh)


def with_weights(state: TrainState, variables: dict, tx, mesh) -> TrainState:
  """`state` with student and teacher both starting from `variables` and a fresh optimizer."""
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  copy_ = lambda tree: jax.tree.map(jnp.copy, tree)  # Distinct buffers: the step donates both.
  fresh = state.replace(params=params, batch_stats=batch_stats, opt_state=tx.init(params),
                        teacher_params=copy_(params), teacher_batch_stats=copy_(batch_stats))
  return parallel.put_replicated(fresh, mesh)


def eval_variables(state: TrainState) -> dict:
  """The weights validation chooses checkpoints by and `ferjax evaluate` scores: the teacher."""
  return {"params": state.teacher_params, "batch_stats": state.teacher_batch_stats}
