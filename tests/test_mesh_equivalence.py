"""The mesh shape changes where arrays live, never what training computes.

On the 8 fake CPU devices of conftest: the same tiny model, seed and global batches give the same
loss trajectory on meshes (data, fsdp, tensor) = (8,1,1), (2,2,2), (1,4,2) and one device; a
checkpoint written on (2,2,2) restores bit-identically onto (1,4,2) and onto one device.
"""

import jax
import multiprocess_worker as tiny
import numpy as np
import pytest

from dalle_jax.sharding import MeshConfig, make_mesh

STEPS = 3
MESHES = {
    "8x1x1": MeshConfig(data=8, fsdp=1, tensor=1),
    "2x2x2": MeshConfig(data=2, fsdp=2, tensor=2),
    "1x4x2": MeshConfig(data=1, fsdp=4, tensor=2),
}


def mesh_of(name: str):
    if name == "1x1x1":
        return make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    return make_mesh(MESHES[name])


@pytest.fixture(scope="module")
def runs():
    """Final state and losses of `STEPS` steps on each mesh (compiled once per mesh)."""
    assert jax.device_count() == 8, "tests/conftest.py should provide 8 fake CPU devices"
    return {name: tiny.train(mesh_of(name), STEPS) for name in ("1x1x1", *MESHES)}


def test_loss_trajectory_is_the_same_on_every_mesh(runs):
    reference = runs["1x1x1"][1]
    assert len(reference) == STEPS and reference[0] != reference[-1]  # training moved
    for name, (_, losses) in runs.items():
        np.testing.assert_allclose(losses, reference, rtol=2e-5, err_msg=f"mesh {name}")


def test_final_parameters_agree_across_meshes(runs):
    reference = tiny.flat_arrays(tiny.to_checkpoint(runs["1x1x1"][0])["params"])
    for name, (state, _) in runs.items():
        params = tiny.flat_arrays(tiny.to_checkpoint(state)["params"])
        assert params.keys() == reference.keys()
        # AdamW divides by the gradient's scale, so float rounding in the reductions moves a
        # parameter by up to ~1e-4 of its learning-rate-sized step; a wrong gradient moves it ~lr.
        for key, value in params.items():
            np.testing.assert_allclose(
                value, reference[key], rtol=1e-4, atol=1e-4, err_msg=f"{name} {key}"
            )


def test_states_are_really_sharded_differently(runs):
    """Guards the test above against a mesh that silently replicated everything."""
    kernels = {
        name: next(
            leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(state[0])[0]
            if leaf.ndim == 2 and "kernel" in jax.tree_util.keystr(path)
        )
        for name, (state, _) in runs.items()
    }
    assert kernels["1x1x1"].sharding.is_fully_replicated
    assert not kernels["1x4x2"].sharding.is_fully_replicated
    assert kernels["2x2x2"].sharding.spec != kernels["1x4x2"].sharding.spec or (
        kernels["2x2x2"].sharding.mesh.shape != kernels["1x4x2"].sharding.mesh.shape
    )


@pytest.mark.parametrize("target", ["1x4x2", "1x1x1"])
def test_checkpoint_of_one_mesh_restores_bit_identically_on_another(runs, target, tmp_path):
    saved = tiny.to_checkpoint(runs["2x2x2"][0])
    tiny.save(str(tmp_path), STEPS, runs["2x2x2"][0])
    mesh = mesh_of(target)
    restored = tiny.restore(str(tmp_path), mesh)
    for leaf in jax.tree.leaves(restored):
        assert leaf.sharding.mesh.shape == mesh.shape
    expected, actual = tiny.flat_arrays(saved), tiny.flat_arrays(restored)
    assert actual.keys() == expected.keys()
    for key in expected:
        assert actual[key].dtype == expected[key].dtype, key
        assert actual[key].tobytes() == expected[key].tobytes(), key  # bit-identical
