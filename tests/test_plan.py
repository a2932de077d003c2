"""The resource plan (pipeline.engine.plan): pools and reservations from a cluster's resources,
without a cluster."""

from __future__ import annotations

import pytest

from pipeline import EmbedConfig
from pipeline.errors import UsageError
from pipeline.engine.plan import plan_resources


def test_resource_plan_fits_two_cpus():
    config = EmbedConfig(input="x", output="y")
    plan = plan_resources(config, {"CPU": 2.0}, nodes=1)
    reserved = plan.num_encoders * plan.encoder_cpus + plan.num_tokenizers * plan.tokenizer_cpus
    assert plan.device == "cpu" and reserved <= 1.5  # read + commit tasks keep 0.5 CPU
    gpu = plan_resources(config, {"CPU": 16.0, "GPU": 2.0}, nodes=2)
    assert gpu.device == "cuda" and gpu.num_encoders == 2 and gpu.encoder_gpus == 1
    assert gpu.num_tokenizers == 13  # up to 8 per GPU, capped by the CPUs the encoders and read/commit leave
    assert plan_resources(config, {"CPU": 16.0, "GPU": 1.0}, nodes=1).num_tokenizers == 8
    with pytest.raises(UsageError, match="no GPUs"):
        plan_resources(EmbedConfig(input="x", output="y", device="cuda"), {"CPU": 2.0}, nodes=1)
    with pytest.raises(UsageError, match="do not fit"):
        plan_resources(EmbedConfig(input="x", output="y", num_encoders=20), {"CPU": 2.0}, nodes=1)


def test_cpu_plan_puts_the_chosen_number_of_encoders_on_every_node():
    config = EmbedConfig(input="x", output="y", encoders_per_node=2)
    plan = plan_resources(config, {"CPU": 32.0}, nodes=2)  # two 16-CPU nodes
    assert plan.device == "cpu" and plan.num_encoders == 4 and plan.encoder_threads == 7  # one core left per node
    node_cpus = 16.0
    assert 2 * plan.encoder_cpus + plan.tokenizer_cpus <= node_cpus  # two replicas and a tokenizer fit a node ...
    assert 3 * plan.encoder_cpus > node_cpus  # ... a third replica does not, so Ray must use the other node
    gpu = plan_resources(config, {"CPU": 32.0, "GPU": 4.0}, nodes=2)
    assert gpu.num_encoders == 4 and gpu.encoder_gpus == 1  # GPUs: one per GPU, encoders_per_node does not apply
    with pytest.raises(UsageError, match="--encoders-per-node must be a positive integer"):
        EmbedConfig(input="x", output="y", encoders_per_node=0)


def test_every_node_of_a_cpu_cluster_keeps_room_for_read_and_commit_tasks():
    """Three 2-CPU nodes: Ray spreads two encoders and a tokenizer on each, and what is left on each node
    must still take a read task, or the chain waits for resources for ever."""
    from pipeline.engine.plan import COMMIT_CPUS, READ_CPUS

    plan = plan_resources(EmbedConfig(input="x", output="y"), {"CPU": 6.0}, nodes=3)
    assert plan.num_encoders == 6 and plan.num_tokenizers == 3
    per_node = 2 * plan.encoder_cpus + plan.tokenizer_cpus
    assert 2.0 - per_node >= READ_CPUS + COMMIT_CPUS - 1e-9


def test_several_encoders_share_a_gpu_and_num_encoders_caps_them():
    config = EmbedConfig(input="x", output="y", encoders_per_gpu=4)
    plan = plan_resources(config, {"CPU": 32.0, "GPU": 2.0}, nodes=2)
    assert plan.device == "cuda" and plan.num_encoders == 8 and plan.encoder_gpus == 0.25
    assert plan.num_tokenizers == 16  # tokenizers follow the GPUs, not the replicas
    capped = plan_resources(EmbedConfig(input="x", output="y", encoders_per_gpu=4, num_encoders=5),
                            {"CPU": 32.0, "GPU": 2.0}, nodes=2)
    assert capped.num_encoders == 5 and capped.encoder_gpus == 0.25  # --num-encoders wins
    with pytest.raises(UsageError, match="only 2 GPUs for 4 encoder"):
        plan_resources(EmbedConfig(input="x", output="y", encoders_per_gpu=4, num_encoders=9), {"CPU": 32.0, "GPU": 2.0},
                       nodes=2)
    with pytest.raises(UsageError, match="add --encoders-per-gpu"):
        plan_resources(EmbedConfig(input="x", output="y", num_encoders=3), {"CPU": 32.0, "GPU": 2.0}, nodes=2)
    assert plan_resources(config, {"CPU": 2.0}, nodes=1).encoder_gpus == 0  # ignored without GPUs


def test_blocks_grow_for_a_cheaper_model_on_cpu_only():
    from pipeline.engine.plan import CPU_BLOCK_ROWS, GPU_BLOCK_ROWS, MAX_CPU_BLOCK_ROWS, REFERENCE_WEIGHTS

    config = EmbedConfig(input="x", output="y")

    def rows(weights, resources=None):
        return plan_resources(config, resources or {"CPU": 2.0}, 1, weights_per_token=weights).block_rows

    assert rows(REFERENCE_WEIGHTS) == rows(None) == rows(3 * REFERENCE_WEIGHTS) == CPU_BLOCK_ROWS
    assert rows(REFERENCE_WEIGHTS // 4) == 4 * CPU_BLOCK_ROWS
    assert rows(8528) == MAX_CPU_BLOCK_ROWS  # the host benchmark's near-zero-cost model
    assert rows(8528, {"CPU": 16.0, "GPU": 1.0}) == GPU_BLOCK_ROWS


def test_the_files_are_built_apart_from_the_encoders_on_gpus_unless_asked_otherwise():
    def writer(resources, **options) -> str:
        return plan_resources(EmbedConfig(input="x", output="y", **options), resources, nodes=1).writer

    cpu, gpu = {"CPU": 2.0}, {"CPU": 16.0, "GPU": 1.0}
    assert writer(cpu) == "encoder"
    assert writer(gpu) == "separate"
    assert writer(gpu, writer="encoder") == "encoder"
    assert writer(cpu, writer="separate") == "separate"
    with pytest.raises(UsageError, match="--writer"):
        EmbedConfig(input="x", output="y", writer="driver")


def test_a_cheap_model_gets_a_tokenizer_per_encoder_and_minilm_one_per_node():
    from pipeline.engine.plan import REFERENCE_WEIGHTS

    config = EmbedConfig(input="x", output="y")
    minilm = plan_resources(config, {"CPU": 2.0}, nodes=1, weights_per_token=REFERENCE_WEIGHTS)
    cheap = plan_resources(config, {"CPU": 2.0}, nodes=1, weights_per_token=8528)  # the host benchmark's model
    assert (minilm.num_tokenizers, minilm.num_encoders) == (1, 2)
    assert (cheap.num_tokenizers, cheap.num_encoders) == (2, 2)
    assert cheap.num_encoders * cheap.encoder_cpus + 2 * cheap.tokenizer_cpus <= 1.5  # read + commit keep 0.5 CPU
    cluster = plan_resources(config, {"CPU": 32.0}, nodes=2, weights_per_token=REFERENCE_WEIGHTS)
    assert cluster.num_tokenizers == 2  # one a node
    assert plan_resources(EmbedConfig(input="x", output="y", num_tokenizers=1), {"CPU": 2.0}, nodes=1,
                          weights_per_token=8528).num_tokenizers == 1  # --num-tokenizers wins
