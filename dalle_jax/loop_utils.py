"""Small helpers shared by the training loops (`vqvae_training`, `training`): batch placement
and padding. Host-side numpy and `jax.Array` construction only; no model code.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Sharding


def round_up(value: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= `value`."""
    return -(-value // multiple) * multiple


def pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
    """array [n, ...] -> [rows, ...] (n <= rows), zero rows appended.

    A short last batch padded to the full size reuses the compiled step instead of compiling
    another one for its shape; callers drop the padded rows' results.
    """
    array = np.asarray(array)
    missing = rows - array.shape[0]
    if missing < 0:
        raise ValueError(f"cannot pad {array.shape[0]} rows down to {rows}")
    if missing == 0:
        return array
    return np.concatenate([array, np.zeros((missing, *array.shape[1:]), array.dtype)])


def host_batch_to_global(local: np.ndarray, sharding: Sharding) -> jax.Array:
    """This host's slice [B/hosts, ...] -> one global array [B, ...] laid out by `sharding`.

    Multi-host: every host passes its own rows (the per-host batch of the input pipeline); the
    global array's rows are the hosts' slices in process order.
    """
    return jax.make_array_from_process_local_data(sharding, np.asarray(local))


def whole_batch_to_global(batch: np.ndarray, sharding: Sharding) -> jax.Array:
    """A batch that every host holds whole [B, ...] -> a global array [B, ...] laid out by
    `sharding`; each host places only the rows its own devices hold (eval, where all hosts
    read the same examples)."""
    batch = np.asarray(batch)
    return jax.make_array_from_callback(batch.shape, sharding, lambda index: batch[index])
