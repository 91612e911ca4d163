"""Devices and hosts: jax.distributed start-up, the 1-D data mesh, and moving arrays on and off it.

Data parallelism with jax.sharding: the batch is split along the mesh's 'data' axis over every
device of every host, parameters and optimizer state are replicated; XLA inserts the gradient
all-reduce. Each host hands in only its own rows (make_array_from_process_local_data).
"""
from __future__ import annotations

import os

import numpy as np

DATA_AXIS = "data"


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


def data_mesh():
    import jax
    from jax.sharding import Mesh

    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


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
    """Replicated global arrays -> numpy on this host (every host holds a full copy)."""
    import jax

    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)
