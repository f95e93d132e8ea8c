"""Device meshes and data placement for data-parallel training (DESIGN principle 3).

The same code runs on one device, on N local devices and on several hosts: the batch axis is
sharded over the mesh axis ``'data'`` and parameters are replicated. On several hosts call
:func:`initialize_distributed` first; every process then builds the same global batch (the data
pipeline is deterministic from the seed) and contributes the rows its devices hold.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def initialize_distributed(**kwargs: Any) -> None:
    """``jax.distributed.initialize(**kwargs)`` (coordinator, process count and id from the
    cluster environment when not given); call once per process before any other JAX work."""
    jax.distributed.initialize(**kwargs)


def make_mesh(num_devices: int | None = None, axis_name: str = "data") -> Mesh:
    """A 1-D mesh over the first ``num_devices`` devices (all of them by default)."""
    devices = jax.devices()
    n = len(devices) if num_devices is None else num_devices
    if not 1 <= n <= len(devices):
        raise ValueError(f"num_devices: expected 1 to {len(devices)}, got {num_devices}")
    return Mesh(np.array(devices[:n]), (axis_name,))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place every leaf of ``tree`` on all devices of ``mesh``."""
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def shard(array: np.ndarray, mesh: Mesh, spec: PartitionSpec) -> jax.Array:
    """A global array laid out by ``spec`` from the full host array ``array``.

    Each process reads only the slices its addressable devices hold, so this works unchanged on
    several hosts when every process has the same ``array``.
    """
    array = np.asarray(array)
    sharding = NamedSharding(mesh, spec)
    for dim, name in enumerate(spec):
        if name is not None and array.shape[dim] % mesh.shape[name]:
            raise ValueError(
                f"array: axis {dim} of shape {array.shape} must be a multiple of the "
                f"{mesh.shape[name]} devices of mesh axis {name!r}"
            )
    return jax.make_array_from_callback(array.shape, sharding, lambda idx: array[idx])


def shard_batch(batch: dict, mesh: Mesh, axis: int = 1, axis_name: str = "data") -> dict:
    """Shard every array of ``batch`` along ``axis`` (the tuple axis ``B`` of a train batch)."""
    spec = PartitionSpec(*([None] * axis), axis_name)
    return {k: shard(v, mesh, spec) for k, v in batch.items()}
