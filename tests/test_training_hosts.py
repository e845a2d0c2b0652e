"""What each process of a multi-process `train dalle` run feeds and resumes from
(`training.host_shard`, `pipeline.state_for_process`), and the TPU pod job `pod-1b`.

Two processes are simulated here by two input pipelines with `process_index` 0 and 1 of 2;
the real two-process runs are in `test_multihost_cli.py` and `test_multiprocess.py`.
"""

import math

import jax
import numpy as np
import pytest
from flax import nnx

from bench.memory import measure
from dalle_jax import training
from dalle_jax.bundle import check_compatible
from dalle_jax.data import pipeline
from dalle_jax.errors import UserError
from dalle_jax.model import DalleTransformer
from dalle_jax.sharding import MeshConfig, make_mesh
from vqvae.config import get_config as get_vqvae_config

EXAMPLES, TEXT_LENGTH, IMAGE_LENGTH = 16, 4, 4
GIB = 2**30


@pytest.fixture(scope="module")
def encoded_dir(tmp_path_factory) -> str:
    """EXAMPLES records whose ids all equal the record's number (to see which one came)."""
    out = tmp_path_factory.mktemp("encoded")
    records = [
        {
            "text_ids": np.full(TEXT_LENGTH, i, np.int32),
            "image_ids": np.full(IMAGE_LENGTH, i, np.int32),
        }
        for i in range(EXAMPLES)
    ]
    pipeline.write_encoded_shards(
        out,
        records,
        text_length=TEXT_LENGTH,
        image_grid=(2, 2),
        text_vocab_size=EXAMPLES,
        image_vocab_size=EXAMPLES,
    )
    return str(out)


def host_iterator(encoded_dir: str, shard: training.HostShard):
    loader = pipeline.LoaderConfig.train(shard.rows, seed=3)
    data = pipeline.encoded_dataset(
        encoded_dir, loader, process_index=shard.index, process_count=shard.count
    )
    return iter(data)


def numbers(batch) -> list[int]:
    return [int(row[0]) for row in batch["text_ids"]]


@pytest.mark.parametrize("sizes", [(8, 1, 1), (2, 2, 2), (1, 1, 8), (1, 8, 1)])
def test_one_process_feeds_the_whole_batch_from_the_whole_data(sizes):
    mesh = make_mesh(MeshConfig(*sizes))
    assert training.host_shard(16, mesh, training.DEFAULT_RULES) == training.HostShard(16, 0, 1)


def test_a_resumed_process_takes_process_0s_state_with_its_own_shard(encoded_dir):
    shards = [training.HostShard(rows=2, index=i, count=2) for i in range(2)]
    hosts = [host_iterator(encoded_dir, shard) for shard in shards]
    for _ in range(3):  # three steps: every host takes one batch per step
        seen = [numbers(next(it)) for it in hosts]
    assert set(seen[0]).isdisjoint(seen[1])  # each host reads its own examples
    saved = hosts[0].get_state()  # what the checkpoint holds: process 0's state
    expected_next = [numbers(next(it)) for it in hosts]

    for shard, expected in zip(shards, expected_next, strict=True):
        resumed = host_iterator(encoded_dir, shard)
        resumed.set_state(pipeline.state_for_process(saved, shard.index, shard.count))
        assert numbers(next(resumed)) == expected

    # Without the change of shard number, process 1 refuses process 0's state: the bug a
    # two-process run hit on its first resume.
    with pytest.raises(UserError, match="process_index: saved 0, now 1"):
        host_iterator(encoded_dir, shards[1]).set_state(saved)


def test_a_state_of_another_process_count_is_refused_naming_the_counts(encoded_dir):
    saved = host_iterator(encoded_dir, training.HostShard(2, 0, 2)).get_state()
    one_process = training.HostShard(rows=4, index=0, count=1)
    state = pipeline.state_for_process(saved, 0, 1)
    assert state == saved  # left alone: the pipeline says what differs
    with pytest.raises(UserError, match="process_count: saved 2, now 1"):
        host_iterator(encoded_dir, one_process).set_state(state)
    assert pipeline.state_for_process(None, 0, 1) is None


# ----------------------------------------------------------------------------- the pod job


def test_the_pod_job_is_a_1b_model_on_an_fsdp_mesh_that_fits_the_base_vqvae():
    job = training.get_job("pod-1b")
    model = nnx.eval_shape(lambda: DalleTransformer(job.model, rngs=nnx.Rngs(0)))
    params = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert 0.9e9 < params < 1.3e9, params
    assert job.model.dtype == "bfloat16" and job.model.remat
    assert job.mesh == MeshConfig(data=1, fsdp=-1, tensor=1)
    check_compatible(job.model, get_vqvae_config("base"))  # 32x32 ids of 8192 codes
    for chips in (32, 64):  # v4-64, v5litepod-64
        assert job.mesh.resolve(chips) == (1, chips, 1)
        assert job.batch_size % chips == 0


@pytest.mark.parametrize(("chips", "hbm_gib"), [(32, 32), (64, 16)])
def test_the_pod_job_fits_the_memory_of_a_v4_64_and_a_v5e_64(chips, hbm_gib):
    job = training.get_job("pod-1b")
    record = measure("1b", (1, chips, 1), job.batch_size, remat=job.model.remat)
    assert record["replicated_fraction"] < 1e-3  # FSDP: nothing large stays whole
    # Half the chip's memory at most: XLA's temporaries and the batch are not counted.
    assert record["total_bytes"] < hbm_gib * GIB / 2, record["total_bytes"] / GIB
