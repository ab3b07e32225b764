"""The reference that ferjax's classifier step is measured against, run on this machine.

  python experiments/reference_resnet18.py                        # plain Flax, 2-core CPU: ~1 min
  python experiments/reference_resnet18.py --framework torch      # PyTorch eager (if installed)
  python experiments/reference_resnet18.py --size 112 --channels 3 --stem standard --batch 256 \
      --dtype bfloat16                                            # the H200 rows
  python experiments/reference_resnet18.py --framework torch --width 0.25 --stem strided \
      --steps 20                                                  # the CPU FER-2013 recipe's net

A small-stem (or torchvision-stem, or strided-stem) ResNet-18 (or -10, one block a stage; at a
width multiplier: 64-128-256-512 times --width channels) train step written the plain way, with
nothing of ferjax: the Flax-examples ResNet with SGD-momentum and softmax cross-entropy on one
random batch, jitted with donation; or torchvision's ResNet layout in PyTorch eager, same stem.
Stems as ferjax's: small 3x3/1 conv; strided 3x3/2 conv; standard 7x7/2 conv + 3x3/2 max-pool.
Prints one JSON line like `ferjax bench`: images/s of a full train step after warm-up, median
of 3 repeats. bench_targets.py's GPU reference figures were measured this way; measuring both sides
on the same machine in the same session is the only fair comparison (CPU figures move by 20-30%
with the machine and its load).
"""

import argparse
import functools
import json
import sys
import time

import numpy as np

NUM_CLASSES = 7


def widths(args) -> tuple[int, ...]:
  return tuple(max(4, int(round(64 * args.width * 2 ** i))) for i in range(4))


def stem_stride(args) -> int:
  return 1 if args.stem == "small" else 2


def flax_step(args):
  """(run one step, block until done) for the plain-Flax ResNet-18."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import optax

  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  conv = functools.partial(nn.Conv, use_bias=False, dtype=dtype)
  norm = functools.partial(nn.BatchNorm, use_running_average=False, momentum=0.9, dtype=dtype)

  class Block(nn.Module):
    filters: int
    strides: int

    @nn.compact
    def __call__(self, x):
      y = nn.relu(norm()(conv(self.filters, (3, 3), self.strides)(x)))
      y = norm()(conv(self.filters, (3, 3))(y))
      if x.shape != y.shape:
        x = norm()(conv(self.filters, (1, 1), self.strides)(x))
      return nn.relu(x + y)

  class ResNet18(nn.Module):
    @nn.compact
    def __call__(self, x):
      if args.stem == "standard":
        x = nn.relu(norm()(conv(widths(args)[0], (7, 7), 2, padding=3)(x)))
        x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
      else:
        x = nn.relu(norm()(conv(widths(args)[0], (3, 3), stem_stride(args))(x)))
      for stage, width in enumerate(widths(args)):
        for i in range(1 if args.depth == 10 else 2):
          x = Block(width, 2 if stage > 0 and i == 0 else 1)(x)
      return nn.Dense(NUM_CLASSES, dtype=dtype)(jnp.mean(x, (1, 2))).astype(jnp.float32)

  model = ResNet18()
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.uniform(-1, 1, (args.batch, args.size, args.size, args.channels)),
                       jnp.float32)
  labels = jnp.asarray(np.arange(args.batch) % NUM_CLASSES)
  variables = model.init(jax.random.key(0), images)
  tx = optax.sgd(0.01, momentum=0.9)
  state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))

  @functools.partial(jax.jit, donate_argnums=0)
  def train_step(state, images, labels):
    params, batch_stats, opt_state = state

    def loss_fn(params):
      logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, images,
                                    mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, updates["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), batch_stats, opt_state), loss

  loss = None

  def run():
    nonlocal state, loss
    state, loss = train_step(state, images, labels)

  return run, lambda: loss.block_until_ready(), jax.devices()[0].device_kind


def torch_step(args):
  """(run one step, block until done) for torchvision's ResNet-18 layout in PyTorch eager."""
  try:
    import torch
    from torch import nn
  except ImportError:
    print("error: --framework torch needs torch (pip install torch); it is not a ferjax "
          "dependency", file=sys.stderr)
    raise SystemExit(2)

  class Block(nn.Module):  # torchvision's BasicBlock.
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(cout)
      self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(cout)
      self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                 nn.BatchNorm2d(cout)) if stride != 1 or cin != cout
                   else nn.Identity())

    def forward(self, x):
      y = torch.relu(self.bn1(self.conv1(x)))
      return torch.relu(self.bn2(self.conv2(y)) + self.down(x))

  standard = args.stem == "standard"
  cin = widths(args)[0]
  layers = [nn.Conv2d(args.channels, cin, 7 if standard else 3, stem_stride(args),
                      3 if standard else 1, bias=False), nn.BatchNorm2d(cin), nn.ReLU()]
  if standard:
    layers.append(nn.MaxPool2d(3, 2, 1))
  for stage, width in enumerate(widths(args)):
    for i in range(1 if args.depth == 10 else 2):
      layers.append(Block(cin, width, 2 if stage > 0 and i == 0 else 1))
      cin = width
  layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, NUM_CLASSES)]

  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = nn.Sequential(*layers).to(device).train()
  optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
  images = torch.rand(args.batch, args.channels, args.size, args.size, device=device) * 2 - 1
  labels = torch.arange(args.batch, device=device) % NUM_CLASSES
  autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

  def run():
    optimizer.zero_grad(set_to_none=True)
    with autocast:
      loss = nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()

  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  name = (torch.cuda.get_device_name() if device == "cuda"
          else f"cpu ({torch.get_num_threads()} threads)")
  return run, sync, name


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--framework", choices=("flax", "torch"), default="flax")
  parser.add_argument("--stem", choices=("small", "standard", "strided"), default="small")
  parser.add_argument("--depth", type=int, choices=(10, 18), default=18)
  parser.add_argument("--width", type=float, default=1.0, help="channel multiplier")
  parser.add_argument("--size", type=int, default=48, help="image side in pixels")
  parser.add_argument("--channels", type=int, choices=(1, 3), default=1)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--steps", type=int, default=3, help="steps per timed repeat")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()

  run, wait, device = (flax_step if args.framework == "flax" else torch_step)(args)
  start = time.perf_counter()
  run()
  wait()
  first_step_s = time.perf_counter() - start  # Compile (Flax) or allocator warm-up (PyTorch).
  rates = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    for _ in range(args.steps):
      run()
    wait()
    rates.append(args.batch * args.steps / (time.perf_counter() - start))
  print(json.dumps({"what": f"reference_{args.framework}", "batch": args.batch,
                    "dtype": args.dtype, "device": device, "stem": args.stem,
                    "model": f"resnet{args.depth}", "width": args.width,
                    "image_size": args.size, "channels": args.channels,
                    "images_per_s": round(float(np.median(rates)), 1),
                    "first_step_s": round(first_step_s, 2)}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
