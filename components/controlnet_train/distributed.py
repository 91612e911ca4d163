"""Devices and hosts: jax.distributed start-up, the 1-D data mesh, and moving arrays on and off it.

Data parallelism with jax.sharding: the batch is split along the mesh's 'data' axis over every
device of every host; XLA inserts the collectives. Each host hands in only its own rows
(make_array_from_process_local_data). The training state (fp32 weights, AdamW moments, EMA) is
either replicated or, ZeRO-style, sharded along the same axis (`state_shardings`): each device then
holds 1/N of it, and the step gathers a compute copy and reduce-scatters the gradients.
"""
from __future__ import annotations

import os

import numpy as np

DATA_AXIS = "data"
SHARD_STATE = ("auto", "sharded", "replicated")


class DistributedConfigError(ValueError):
    """A multi-host run that cannot start: the message names the missing setting."""


def initialize(num_processes: int, coordinator_address: str) -> None:
    """Starts jax.distributed when the run spans hosts; must precede any other JAX call that touches devices.

    The coordinator comes from the config or JAX_COORDINATOR_ADDRESS; this host's index from
    JAX_PROCESS_ID; JAX_NUM_PROCESSES, when set, must agree with the config.
    """
    import jax

    if num_processes <= 1:
        return
    address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    process_id = os.environ.get("JAX_PROCESS_ID", "")
    env_count = os.environ.get("JAX_NUM_PROCESSES", "")
    if not address:
        raise DistributedConfigError(
            f"train.num_processes={num_processes} needs train.coordinator_address or JAX_COORDINATOR_ADDRESS (host:port of process 0)"
        )
    if not process_id.isdigit():
        raise DistributedConfigError(f"train.num_processes={num_processes} needs JAX_PROCESS_ID (0..{num_processes - 1}) on every host")
    if env_count and int(env_count) != num_processes:
        raise DistributedConfigError(f"JAX_NUM_PROCESSES={env_count} disagrees with train.num_processes={num_processes}")
    jax.distributed.initialize(coordinator_address=address, num_processes=num_processes, process_id=int(process_id))


def wait_for_hosts(name: str, timeout_s: int = 3600) -> None:
    """Returns once every host got here (nothing to wait for on one). The coordination service's barrier, not a
    device collective: a host may be minutes behind (still compiling) without a collective timing out."""
    import jax

    if jax.process_count() == 1:
        return
    from jax._src import distributed as jax_distributed  # the client jax.distributed.initialize made (no public barrier without devices)

    jax_distributed.global_state.client.wait_at_barrier(name, timeout_s * 1000)


def data_mesh(devices=None):
    import jax
    from jax.sharding import Mesh

    return Mesh(np.asarray(devices if devices is not None else jax.devices()), (DATA_AXIS,))


def shard_state_on(setting: str, device_count: int) -> bool:
    """train.shard_state: 'auto' shards wherever there is more than one device (on one, both layouts are the same)."""
    return setting == "sharded" or (setting == "auto" and device_count > 1)


def sharded_spec(shape: tuple[int, ...], count: int):
    """The leaf's largest dimension divisible by `count` carries the data axis; a leaf with none stays replicated."""
    from jax.sharding import PartitionSpec

    dims = [i for i, n in enumerate(shape) if n >= count and n % count == 0]
    if count == 1 or not dims:
        return PartitionSpec()
    best = max(dims, key=lambda i: shape[i])  # the first of equals
    return PartitionSpec(*(DATA_AXIS if i == best else None for i in range(len(shape))))


def state_shardings(mesh, tree, shard: bool):
    """One NamedSharding per leaf of a params-like tree (arrays or shape structs): sharded per `sharded_spec`, or replicated."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    count = mesh.devices.size
    return jax.tree.map(lambda x: NamedSharding(mesh, sharded_spec(tuple(x.shape), count) if shard else PartitionSpec()), tree)


def place(tree, shardings):
    """Host values (identical on every host) -> global arrays with the given shardings; each device gets only its slice."""
    import jax

    def one(x, sharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(one, tree, shardings)


def bytes_per_device(tree) -> int:
    """Bytes of the tree's arrays on this host's first device (its shard of sharded leaves, all of replicated ones)."""
    import jax

    device = jax.local_devices()[0]
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == device)


def replicated(mesh):
    from jax.sharding import NamedSharding, PartitionSpec

    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh):
    from jax.sharding import NamedSharding, PartitionSpec

    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def global_batch(mesh, local: dict[str, np.ndarray], global_rows: int) -> dict:
    """This host's rows -> one global array per field, sharded on 'data' across all hosts' devices."""
    import jax

    sharding = batch_sharded(mesh)
    return {
        name: jax.make_array_from_process_local_data(sharding, value, (global_rows, *value.shape[1:]))
        for name, value in local.items()
    }


def replicate(mesh, tree):
    """Host values (identical on every host) -> replicated global arrays."""
    import jax

    sharding = replicated(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def to_host(tree):
    """Global arrays -> numpy on this host. Replicated ones are read from one local device; sharded ones are
    assembled from this host's shards, or, where other hosts hold some, first gathered (one program for the tree)."""
    import jax

    remote = [x for x in jax.tree.leaves(tree) if not x.is_fully_replicated and not x.is_fully_addressable]
    gathered = {}
    if remote:
        mesh = remote[0].sharding.mesh
        copies = jax.jit(lambda xs: xs, out_shardings=replicated(mesh))(remote)
        gathered = {id(x): c for x, c in zip(remote, copies)}

    def one(x):
        x = gathered.get(id(x), x)
        return np.asarray(x.addressable_data(0)) if x.is_fully_replicated else np.asarray(x)

    return jax.tree.map(one, tree)
