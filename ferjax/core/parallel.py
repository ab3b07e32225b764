"""Device mesh and shardings: one code path for 1 CPU, 8 GPUs and a multi-host pod.

Data parallelism only: parameters are replicated, batches are split along the mesh axis
`data`. Inside a jitted step, `jax.lax.with_sharding_constraint(x, batch_sharding(mesh))` on
the sampled batch is all it takes; XLA inserts the gradient all-reduce, and BatchNorm
statistics computed with plain `jnp.mean` over the batch axis are global-batch statistics.

The resident train images are split by rows over the same axis (`put_rows`): each device holds
1/D of them and each process places only the rows of its own devices. A batch gathered from
them by global indices is the same batch as from a replicated copy: XLA gathers each index on
the device that holds the row and sums the (otherwise zero) results over the axis, a uint8
all-reduce of one batch. So results do not depend on the device or process count.

Several processes (hosts): every process runs the same program; small arrays (labels, class
index, parameters) are replicated with `put_replicated`, the images with `put_rows`, which
reads a prepared dataset's train split from disk (`ferjax.data.splits.load_split`) only for the process's
own rows; arrays span the devices of all processes. Results come back to the host with `to_host`, and only
process 0 (`is_main_process`) writes files; orbax coordinates checkpoint writes itself.
"""

import functools
import os
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ferjax.errors import UserError

DATA_AXIS = "data"


DEFAULT_INIT_TIMEOUT_S = 300


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None,
                           timeout_s: float = DEFAULT_INIT_TIMEOUT_S):
  """Starts jax.distributed from arguments or the usual environment variables.

  With no arguments and none of JAX_COORDINATOR_ADDRESS / SLURM / TPU pod variables set, this is
  a single-process run and nothing happens. Must run before anything touches a device. Says at
  once what it waits for; when the coordinator or a peer has not come after `timeout_s`, ends
  the process with one line and exit code 2 (jax's own timeout aborts with a C++ stack trace).
  """
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if num_processes is None:
    num_processes = _env_int("JAX_NUM_PROCESSES")
  if process_id is None:
    process_id = _env_int("JAX_PROCESS_ID")
  on_cluster = any(k in os.environ for k in ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES"))
  if coordinator_address is None and not on_cluster:
    if num_processes not in (None, 1) or process_id not in (None, 0):
      raise UserError(f"--num-processes {num_processes} / --process-id {process_id} without "
                      "--coordinator-address: a multi-process run needs the host:port of "
                      "process 0 (or JAX_COORDINATOR_ADDRESS)")
    return False
  _check_processes(coordinator_address, num_processes, process_id, on_cluster)
  if not timeout_s > 0:
    raise UserError(f"--init-timeout: expected a positive number of seconds, got {timeout_s}")
  # CPU processes reduce across each other over TCP (gloo); without it a multi-process CPU run
  # has no cross-process collectives. Only the CPU client reads this; GPUs and TPUs ignore it.
  if jax.config.jax_cpu_collectives_implementation is None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  who = (f"process {process_id} of {num_processes}" if num_processes is not None
         else "this process (ids from the cluster)")
  print(f"{who}: waiting up to {timeout_s:g} s for the coordinator "
        f"{coordinator_address or '(from the cluster)'} and every process to join", flush=True)
  watchdog = threading.Timer(timeout_s, _give_up, (who, coordinator_address, num_processes,
                                                   timeout_s))
  watchdog.daemon = True
  watchdog.start()
  try:  # jax's timeout is later than ours: its expiry aborts the process with a stack trace.
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               initialization_timeout=int(timeout_s) + 60)
  except (ValueError, RuntimeError) as e:
    raise UserError(f"multi-process start failed: {str(e).splitlines()[0][:200]}") from None
  finally:
    watchdog.cancel()
  return True


def _env_int(name: str) -> int | None:
  raw = os.environ.get(name)
  if raw is None:
    return None
  try:
    return int(raw)
  except ValueError:
    raise UserError(f"environment variable {name}={raw!r}: expected an integer") from None


def _check_processes(coordinator_address, num_processes, process_id, on_cluster) -> None:
  if num_processes is not None and num_processes < 1:
    raise UserError(f"--num-processes {num_processes}: expected at least 1")
  if process_id is not None and not 0 <= process_id < (num_processes or process_id + 1):
    raise UserError(f"--process-id {process_id}: expected 0..{num_processes - 1} with "
                    f"--num-processes {num_processes}")
  if not on_cluster and (num_processes is None or process_id is None):
    raise UserError(f"--coordinator-address {coordinator_address}: also give --num-processes "
                    "and --process-id (or JAX_NUM_PROCESSES and JAX_PROCESS_ID)")
  if coordinator_address is not None:
    host, _, port = coordinator_address.rpartition(":")
    if not host or not port.isdigit():
      raise UserError(f"--coordinator-address {coordinator_address!r}: expected host:port")


def _give_up(who, coordinator_address, num_processes, timeout_s) -> None:
  """Runs on the watchdog thread: jax.distributed.initialize blocks the main one in C++."""
  print(f"ferjax: error: {who}: timed out after {timeout_s:g} s waiting for the coordinator "
        f"{coordinator_address} and all {num_processes} processes: start every process with the "
        "same --coordinator-address and --num-processes (or raise --init-timeout)",
        file=sys.stderr, flush=True)
  os._exit(2)


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D mesh over all devices of all processes (or the first `num_devices`)."""
  devices = jax.devices()
  if num_devices is not None:
    if num_devices > len(devices):
      raise UserError(f"num_devices: asked for {num_devices}, only {len(devices)} available")
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


# For functions that run once (parameter initialisation): on CPU the optimised build of the
# initialisers' random-number code takes ~20 s for the VAE-GAN (3 s unoptimised). Always the
# same options, so the same seed gives the same parameters.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def init_replicated(init_fn, mesh: Mesh, *, fast_compile: bool = True):
  """`init_fn()` (a train state's initialisation) compiled straight into arrays replicated over
  the mesh; with `fast_compile`, without LLVM optimisation (FAST_COMPILE). The two builds can
  differ in the last bits of the parameters, so a kind of run keeps one choice forever: the
  classifier keeps the optimised build its published results were made with (and draws its
  parameters with the fast-compiling `rbg` generator instead), the VAE-GAN the fast one."""
  init = jax.jit(init_fn, out_shardings=replicated(mesh))
  return init.lower().compile(compiler_options=FAST_COMPILE if fast_compile else None)()


def abstract_replicated(init_fn, mesh: Mesh):
  """Shapes, dtypes and (replicated) shardings of `init_fn()`'s result, computing nothing: the
  target a checkpoint is restored into."""
  sharding = replicated(mesh)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                      jax.eval_shape(init_fn))


def jit_once(fn, **jit_kwargs):
  """`jax.jit(fn, **jit_kwargs)` that must trace (and so compile) only once: a second trace,
  from a changed shape, dtype or static value, raises at once instead of silently recompiling
  every step. The count belongs to this function object, so each run's new step starts at zero
  (chex.assert_max_traces counts by definition site, so two runs in one process would trip it).
  """
  traces = 0

  @functools.wraps(fn)
  def traced(*args, **kwargs):
    nonlocal traces
    traces += 1
    if traces > 1:
      raise AssertionError(f"{fn.__name__} was traced {traces} times: a shape, dtype or static "
                           "argument changed between calls, which recompiles the step")
    return fn(*args, **kwargs)

  return jax.jit(traced, **jit_kwargs)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def check_train_devices(train) -> None:
  """A config's `train.num_devices` (None: all) against the devices there are, and
  `train.batch_size` against their count: one line naming the field when either does not fit."""
  available = jax.device_count()
  if train.num_devices is not None and train.num_devices > available:
    raise UserError(f"config field 'train.num_devices': expected None or 1..{available} (devices "
                    f"available), got {train.num_devices!r}")
  n = train.num_devices or available
  if train.batch_size % n:
    raise UserError(f"config field 'train.batch_size': expected a positive multiple of the "
                    f"device count ({n}), got {train.batch_size!r}")


def check_batch_size(batch_size: int, mesh: Mesh, field: str = "batch_size") -> None:
  n = mesh.devices.size
  if batch_size <= 0 or batch_size % n:
    raise UserError(f"config field {field!r}: expected a positive multiple of the device count "
                    f"({n}), got {batch_size}")


def put_replicated(tree, mesh: Mesh):
  """Places a host pytree on every device of the mesh (parameters, resident datasets).

  With several processes each passes the same host values (jax checks they agree) and fills
  its own devices; arrays already on one local device go through the host first, since jax
  does not move a committed single-device array onto other processes' devices.
  """
  if jax.process_count() > 1:
    tree = jax.tree.map(_host_if_local, tree)
  return jax.device_put(tree, replicated(mesh))


ROWS_PER_READ = 4096  # Lazily read rows go to the device this many at a time.


def put_rows(rows, mesh: Mesh, rows_per_read: int = ROWS_PER_READ) -> jax.Array:
  """Places rows [N, ...] split by rows over the mesh's devices (see module docstring).

  Zero rows pad N up to a multiple of the device count; index only rows < N. Each process
  reads only the rows of its own devices. `rows` is a numpy array or anything with `shape`,
  `dtype` and slicing that reads (`ferjax.data.dataset.LazyImages`); the latter is read
  `rows_per_read` rows at a time into a buffer already on the device, so host memory holds one
  chunk, never the split.
  """
  num_devices = mesh.devices.size
  padded = -(-rows.shape[0] // num_devices) * num_devices
  shape = (padded, *rows.shape[1:])
  if not isinstance(rows, np.ndarray):
    return _put_rows_in_chunks(rows, shape, mesh, rows_per_read)

  def device_rows(index):
    start, stop, _ = index[0].indices(padded)
    block = np.zeros((stop - start, *rows.shape[1:]), rows.dtype)
    real_stop = min(stop, rows.shape[0])
    if real_stop > start:
      block[:real_stop - start] = rows[start:real_stop]
    return block

  return jax.make_array_from_callback(shape, batch_sharding(mesh), device_rows)


@functools.partial(jax.jit, donate_argnums=0)
def _write_rows(block, chunk, at):
  return jax.lax.dynamic_update_slice_in_dim(block, chunk, at, axis=0)


def _put_rows_in_chunks(rows, shape, mesh: Mesh, rows_per_read: int) -> jax.Array:
  sharding = batch_sharding(mesh)
  num_real = rows.shape[0]
  blocks = []
  for device, index in sharding.addressable_devices_indices_map(shape).items():
    start, stop, _ = index[0].indices(shape[0])
    block = jnp.zeros((stop - start, *shape[1:]), rows.dtype, device=device)
    for first in range(start, min(stop, num_real), rows_per_read):
      last = min(first + rows_per_read, stop, num_real)
      chunk = jax.device_put(np.asarray(rows[first:last]), device)
      block = _write_rows(block, chunk, np.int32(first - start))
    blocks.append(block)
  # dtype: a process may hold none of the mesh's devices (train.num_devices below the total).
  return jax.make_array_from_single_device_arrays(shape, sharding, blocks, dtype=rows.dtype)


def _host_if_local(x):
  if (isinstance(x, jax.Array) and x.is_fully_addressable
      and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)):
    return np.asarray(x)
  return x


def is_main_process() -> bool:
  """True in process 0, the one process that writes files (metrics, config, plots)."""
  return jax.process_index() == 0


def to_host(x) -> np.ndarray:
  """The whole value of a device array as host numpy, also when it spans several processes.

  Replicated or process-local arrays are read locally; a batch-sharded array of a multi-process
  run is gathered from every process (all processes must call this together).
  """
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(x)
  if x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
