"""Progress reports from the stages, and the watchdog that ends a stalled run.

Each stage holds a `Progress` and wraps its units of work in `step()`; the
encoder also `tick()`s after every micro-batch. Reports go, fire-and-forget,
to one `ProgressBoard` actor per run. The driver asks the board how long
nothing has moved; past `--stall-timeout` it ends the run with a message
naming the stage that holds the oldest unfinished step, instead of waiting
forever (a hung model, a lost device, actors that can never be scheduled).
"""

from __future__ import annotations

import contextlib
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterator

# What each stage needs to start, for the message when it never does.
STAGES = ("tokenize", "encode", "write")


class ProgressBoard:
    """A Ray actor (0 CPUs) that keeps the time of the last report and the steps under way."""

    def __init__(self) -> None:
        self.created = time.time()
        self.last = time.monotonic()
        self.inflight: dict[str, tuple[str, str, float]] = {}
        self.started: set[str] = set()
        self.actors: list[Any] = []
        self.spans: dict[str, dict[str, float]] = {}
        self.replicas: dict[str, dict[str, Any]] = {}

    def begin(self, stage: str, key: str, what: str) -> None:
        self.inflight[key] = (stage, what, time.monotonic())
        self.started.add(stage)
        self.last = time.monotonic()

    def end(self, key: str, began: float | None = None, ended: float | None = None, cpu: float = 0.0) -> None:
        step = self.inflight.pop(key, None)
        self.last = time.monotonic()
        if step is not None and began is not None and ended is not None:
            self._account(step[0], step[1], began, ended, None, cpu)

    def account(
        self, stage: str, what: str, began: float, ended: float, busy: float | None = None, cpu: float = 0.0,
    ) -> None:
        """A finished piece of work that was not a step: a read task's time inside its generator
        (`busy`, less than ended - began), the encoder's time inside the model call."""
        self.last = time.monotonic()
        self._account(stage, what, began, ended, busy, cpu)

    def _account(
        self, stage: str, what: str, began: float, ended: float, busy: float | None = None, cpu: float = 0.0,
    ) -> None:
        """Per stage and kind of step (loading, encoding, ...): count, busy seconds (wall clock),
        CPU seconds of the thread that did it, first start, last end."""
        name = f"{stage}.{what.split()[0]}"
        span = self.spans.setdefault(name, {"steps": 0, "busy_s": 0.0, "cpu_s": 0.0, "first": began, "last": ended})
        span["steps"] += 1
        span["cpu_s"] += cpu
        span["busy_s"] += ended - began if busy is None else busy
        span["first"] = min(span["first"], began)
        span["last"] = max(span["last"], ended)

    def timings(self) -> dict[str, Any]:
        """Where the run's time went: for each stage step kind, seconds from the board's start
        (`origin_unix`, the board's start as a Unix time)."""
        return {
            "origin_unix": round(self.created, 3),
            **{name: {
                "steps": int(s["steps"]),
                "busy_s": round(s["busy_s"], 3),
                "cpu_s": round(s["cpu_s"], 3),
                "first_s": round(s["first"] - self.created, 3),
                "last_s": round(s["last"] - self.created, 3),
            }
            for name, s in sorted(self.spans.items())},
        }

    def tick(self) -> None:
        self.last = time.monotonic()

    def register(self, stage: str, actor: Any) -> None:
        """A stage actor announces itself, so a stalled run can be torn down."""
        self.started.add(stage)
        self.actors.append(actor)
        self.last = time.monotonic()

    def place(self, actor_id: str, where: dict[str, Any]) -> None:
        """Where a stage actor runs (stage, node, IP, GPUs, device); a restarted actor replaces its entry."""
        self.replicas[actor_id] = where

    def placements(self) -> list[dict[str, Any]]:
        return list(self.replicas.values())

    def status(self) -> "BoardStatus":
        now = time.monotonic()
        oldest = min(self.inflight.values(), key=lambda v: v[2], default=None)
        return BoardStatus(
            idle=now - self.last,
            stage=oldest[0] if oldest else None,
            what=oldest[1] if oldest else None,
            busy_for=now - oldest[2] if oldest else 0.0,
            started=tuple(sorted(self.started)),
        )

    def registered_actors(self) -> list[Any]:
        return list(self.actors)


@dataclass(frozen=True)
class BoardStatus:
    idle: float  # seconds since any stage last reported
    stage: str | None  # stage holding the oldest unfinished step
    what: str | None
    busy_for: float
    started: tuple[str, ...]


def stall_message(status: BoardStatus, timeout: float, lost_nodes: list[str] | None = None) -> str:
    """One line saying which stage stopped moving, and what the user can do. `lost_nodes`: nodes that
    left the cluster during the run, whose actors Ray could not place anywhere else."""
    hint = "; rerun the same command to resume (raise --stall-timeout if this step is just slow)"
    if lost_nodes:
        hint = (
            f" after {len(lost_nodes)} node(s) left the cluster ({', '.join(lost_nodes)}) and no other node had room "
            "for their actors; rerun the same command to resume"
        )
    if status.stage is not None:
        return (
            f"the {status.stage} stage made no progress for {status.idle:.0f}s "
            f"(stuck {status.what or 'on a batch'} for {status.busy_for:.0f}s){hint}"
        )
    missing = [s for s in STAGES if s not in status.started]
    if missing:
        return (
            f"no progress for {status.idle:.0f}s: the {missing[0]} stage never started "
            f"(its actors or tasks may be waiting for resources the cluster lacks){hint}"
        )
    return f"no stage made progress for {status.idle:.0f}s (waiting for input to be read){hint}"


class Progress:
    """A stage's handle on the board; does nothing when there is no board."""

    TICK_EVERY_S = 0.5  # a long step's sign of life: the watchdog counts tens of seconds

    def __init__(self, board: Any | None, stage: str, cpu_clock=time.thread_time):
        """`cpu_clock`: what a step's CPU time is read from: the calling thread's (default), or
        time.process_time for an actor whose library spreads one call over threads of its own (the
        Rust tokenizer), where the process does nothing else."""
        self.board = board
        self.stage = stage
        self._ticked = 0.0
        self._cpu = cpu_clock

    def register_actor(self) -> None:
        if self.board is None:
            return
        import ray

        actor = ray.get_runtime_context().current_actor
        self.board.register.remote(self.stage, actor)

    def report_placement(self, **extra: Any) -> None:
        """Tell the board which node (and GPUs) this stage actor runs on, for the manifest."""
        if self.board is None:
            return
        self.board.place.remote(*replica_placement(self.stage, **extra))

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        if self.board is None:
            yield
            return
        key = uuid.uuid4().hex
        self.board.begin.remote(self.stage, key, what)
        began, cpu = time.time(), self._cpu()
        try:
            yield
        finally:
            self.board.end.remote(key, began, time.time(), self._cpu() - cpu)

    def tick(self) -> None:
        """A sign of life inside a step (after each micro-batch), sent at most every TICK_EVERY_S."""
        if self.board is not None and time.monotonic() - self._ticked >= self.TICK_EVERY_S:
            self._ticked = time.monotonic()
            self.board.tick.remote()

    def account(self, what: str, began: float, ended: float, busy: float | None = None, cpu: float = 0.0) -> None:
        """Report a finished piece of work (see ProgressBoard.account)."""
        if self.board is not None:
            self.board.account.remote(self.stage, what, began, ended, busy, cpu)

    def timed(self, what: str, blocks: Iterator[Any]) -> Iterator[Any]:
        """`blocks` as they are, each reported with the time spent producing it (not the time
        its consumer held it): a read task's generator."""
        while True:
            began, t0, cpu = time.time(), time.perf_counter(), time.thread_time()
            try:
                block = next(blocks)
            except StopIteration:
                return
            self.account(what, began, time.time(), time.perf_counter() - t0, time.thread_time() - cpu)
            yield block


def replica_placement(stage: str, **extra: Any) -> tuple[str, dict[str, Any]]:
    """(actor id, where it runs) of the calling Ray actor: node id and IP, the GPUs Ray gave it."""
    import ray

    ctx = ray.get_runtime_context()
    where = {
        "stage": stage,
        "node_id": ctx.get_node_id(),
        "node_ip": ray.util.get_node_ip_address(),
        "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
        **extra,
    }
    return ctx.get_actor_id(), where
