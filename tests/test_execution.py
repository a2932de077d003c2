"""Running a chain (pipeline.engine.execution): the stall watchdog loop `watched` on a real board,
and Ray Data's settings and logging restored after a run."""

from __future__ import annotations

import time

import pytest

from pipeline import EmbedConfig
from pipeline.commands.embed import run_embed


def test_the_watchdog_kills_the_stage_actors_and_names_the_stalled_step(ray_cluster):
    """The driver's watchdog on a real board and a real stage actor: a step that stops reporting
    ends the run with one line naming it, and the stage's actors are killed (so Ray Data stops)."""
    import ray

    from pipeline.errors import PipelineError
    from pipeline.engine.execution import watched as _watched
    from pipeline.engine.watchdog import ProgressBoard

    board = ray.remote(num_cpus=0)(ProgressBoard).remote()

    @ray.remote(num_cpus=0)
    class Stage:
        def ping(self) -> bool:
            return True

    actor = Stage.remote()
    ray.get(board.register.remote("encode", actor))
    ray.get(board.begin.remote("encode", "step-1", "encoding 50 rows"))

    def results():  # one block, then nothing, as a hung encoder gives, until its actor is gone
        yield "block 1"
        deadline = time.time() + 60
        while time.time() < deadline:
            ray.get(actor.ping.remote())
            time.sleep(0.2)
        raise AssertionError("the watchdog never ended the run")

    got = []
    try:
        with pytest.raises(PipelineError, match="the encode stage made no progress for [0-9]+s") as err:
            for item in _watched(results(), board, stall_timeout=2):
                got.append(item)
        assert got == ["block 1"] and "stuck encoding 50 rows" in str(err.value)
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.ping.remote())
    finally:
        ray.kill(board)


def test_a_run_leaves_ray_data_and_logging_as_it_found_them_so_a_second_run_in_one_process_works(
    ray_cluster, tmp_path, tiny_model
):
    """run_embed changes Ray Data's context, the ray.data logger's level and the log record factory
    for its chain, and restores every one of them (pipeline.engine.execution.ray_data_settings)."""
    import logging

    from ray.data import DataContext

    def state():
        ctx = DataContext.get_current()
        return (
            ctx.max_errored_blocks, ctx.target_max_block_size, ctx.wait_for_min_actors_s, ctx.enable_progress_bars,
            ctx.print_on_execution_start, ctx.execution_options.resource_limits,
            logging.getLogger("ray.data").level, logging.getLogRecordFactory(),
        )

    src = tmp_path / "in"
    src.mkdir()
    (src / "a.txt").write_text("one\ntwo\nthree\n")
    before = state()
    for k in range(2):
        result = run_embed(EmbedConfig(input=str(src), output=str(tmp_path / f"out{k}"), model=tiny_model, quiet=True))
        assert result.embedded == 3
        assert state() == before, f"run {k + 1} left a global setting changed"


def test_a_lost_actor_is_told_apart_from_a_failure_of_the_work_and_named_with_the_lost_nodes():
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError

    from pipeline.engine.execution import _actor_lost, explain, lost_node_message

    unavailable = ActorUnavailableError("The actor is temporarily unavailable: RpcError: failed to connect", b"\x01" * 16)
    assert _actor_lost(unavailable) == "node" and _actor_lost(ActorDiedError()) == "actor"  # only "node" waits
    try:
        raise RuntimeError("the executor stopped") from unavailable  # as Ray Data re-raises it
    except RuntimeError as wrapped:
        assert _actor_lost(wrapped) == "node"
    assert not _actor_lost(ValueError("bad token ids")) and not _actor_lost(RayTaskError("f", "tb", ValueError("x")))

    line = lost_node_message(explain(unavailable), ["10.0.3.7 (3f2a9c1e)"])
    assert line.startswith("1 node(s) left the cluster (10.0.3.7 (3f2a9c1e)) and the run could not go on without them (")
    assert line.endswith("; rerun the same command to resume: committed files are kept") and "\n" not in line
