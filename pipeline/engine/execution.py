"""Running a Ray Data chain from the driver: its settings (restored afterwards), a watchdog over its
progress, and one clear error instead of Ray's tracebacks."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import warnings
from typing import Any, Iterator

from pipeline.errors import EmbedpipeError, InputError, PipelineError, UsageError

STOP_WAIT_S = 60  # how long a failed run waits for Ray Data's executor to wind down
NODE_DEATH_WAIT_S = 30  # how long a lost actor's error waits for Ray to mark its node dead (a few health checks)


@contextlib.contextmanager
def ray_data_settings(quiet: bool, object_store_memory: int | None = None, **settings: Any) -> Iterator[None]:
    """Ray Data's settings for one run of a chain, and the console kept free of its tracebacks
    (`_keep_tracebacks_off_the_console`, unless EMBEDPIPE_DEBUG=1); all restored afterwards, so that a
    second run in the same process, or the caller's own Ray Data work, starts from the caller's.
    `settings` are DataContext attributes (None: leave as is)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    wanted = {"max_errored_blocks": 0, "enable_progress_bars": not quiet, "print_on_execution_start": not quiet,
              **{k: v for k, v in settings.items() if v is not None}}
    saved = {name: getattr(ctx, name) for name in wanted}
    saved_limits = ctx.execution_options.resource_limits
    data_logger = logging.getLogger("ray.data")
    saved_level, saved_factory = data_logger.level, logging.getLogRecordFactory()
    saved_filters = warnings.filters[:]
    try:
        for name, value in wanted.items():
            setattr(ctx, name, value)
        if object_store_memory is not None:
            ctx.execution_options.resource_limits = saved_limits.copy(object_store_memory=object_store_memory)
        if quiet:  # errors only: not even "Progress bars disabled"
            data_logger.setLevel(logging.ERROR)
        # advice to whoever wrote the chain (override_num_blocks): a small input read by one task
        warnings.filterwarnings("ignore", message="The minimum number of concurrent actors", category=UserWarning)
        warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks", category=UserWarning)
        if os.environ.get("EMBEDPIPE_DEBUG") != "1":
            _keep_tracebacks_off_the_console()
        yield
    finally:
        for name, value in saved.items():
            setattr(ctx, name, value)
        ctx.execution_options.resource_limits = saved_limits
        data_logger.setLevel(saved_level)
        logging.setLogRecordFactory(saved_factory)
        warnings.filters[:] = saved_filters


def watched(batches: Iterator, board, stall_timeout: float) -> Iterator:
    """Yield from `batches` (consumed on a helper thread), ending the run if no stage progresses.

    Past `stall_timeout` seconds without any report on the board, the stage
    actors are killed (so the streaming executor stops) and a PipelineError
    names the stage that stalled. 0 disables the watchdog.
    """
    import queue
    import threading

    import ray

    from pipeline.engine.watchdog import stall_message

    items: queue.Queue = queue.Queue()
    done = object()

    def pump() -> None:
        try:
            for item in batches:
                items.put((item, None))
            items.put((done, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the driver thread
            items.put((None, exc))

    # The consumer thread must be gone before Ray shuts down, or Ray Data's executor,
    # still winding down, logs tracebacks and may even start a new local Ray.
    running_before = _executors()
    nodes_before = _alive_nodes()
    pumping = threading.Thread(target=pump, name="embedpipe-results", daemon=True)
    pumping.start()
    poll = min(5.0, stall_timeout / 4) if stall_timeout else 5.0
    finished = False
    try:
        while True:
            try:
                item, error = items.get(timeout=poll)
            except queue.Empty:
                if not stall_timeout:
                    continue
                status = ray.get(board.status.remote())
                if status.idle < stall_timeout:
                    continue
                for actor in ray.get(board.registered_actors.remote()):
                    ray.kill(actor, no_restart=True)
                raise PipelineError(stall_message(status, stall_timeout, _lost(nodes_before))) from None
            if error is not None:
                kind = _actor_lost(error)  # a node's loss may take Ray a few health checks to see
                lost = _lost(nodes_before, wait=NODE_DEATH_WAIT_S if kind == "node" else 0) if kind else []
                if lost:
                    raise PipelineError(lost_node_message(explain(error), lost)) from None
                raise error
            if item is done:
                finished = True
                return
            yield item
    finally:
        if not finished:  # a stall, a failure, or the caller stopped reading: stop the chain's executor
            _stop_executors(_executors() - running_before)
        pumping.join(STOP_WAIT_S)


def _alive_nodes() -> dict[str, str]:
    """The cluster's live nodes: id -> address."""
    import ray

    return {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in ray.nodes() if n.get("Alive")}


def _lost(nodes_before: dict[str, str], wait: float = 0.0) -> list[str]:
    """Addresses of the nodes alive when the chain started that are gone now (a stall's likely cause);
    with `wait`, polls that long for one to go (Ray marks a node dead a few health checks after it dies)."""
    import time

    deadline = time.monotonic() + wait
    while True:
        alive = _alive_nodes()
        lost = [f"{address} ({node_id[:8]})" for node_id, address in nodes_before.items() if node_id not in alive]
        if lost or time.monotonic() >= deadline:
            return lost
        time.sleep(1.0)


def _actor_lost(error: BaseException) -> str | None:
    """Whether a failure is Ray losing an actor (not an error of the work itself): "node" where its
    node may be gone (the actor unreachable, a node died), "actor" for another actor death (a
    constructor that failed), None otherwise."""
    from ray.exceptions import ActorUnavailableError, NodeDiedError, RayActorError

    kind = None
    for e in _causes(error):
        if isinstance(e, (ActorUnavailableError, NodeDiedError)) or _NODE_LOST_TEXT.search(str(e)):
            return "node"
        if isinstance(e, RayActorError) or _ACTOR_LOST_TEXT.search(str(e)):
            kind = "actor"
    return kind


def lost_node_message(cause: EmbedpipeError, lost: list[str]) -> str:
    """The one line for a run that could not go on after nodes left the cluster."""
    why = str(cause).removeprefix("the run failed: ")
    return (f"{len(lost)} node(s) left the cluster ({', '.join(lost)}) and the run could not go on without "
            f"them ({why[:200]}); rerun the same command to resume: committed files are kept")


def _executors() -> set:
    """Ray Data's streaming executors running in this process (each is a thread)."""
    import threading

    try:
        from ray.data._internal.execution.streaming_executor import StreamingExecutor
    except ImportError:  # a Ray Data without it: nothing to stop (only noisier logs)
        return set()
    return {t for t in threading.enumerate() if isinstance(t, StreamingExecutor) and t.is_alive()}


def _stop_executors(executors: set) -> None:
    """Shut down the executors a failed chain left running (never the caller's own datasets'): once Ray
    has shut down, a running one logs tracebacks from its stats thread and may start a new local Ray.
    Ray Data's own call for it (Dataset._synchronize_progress_bar does the same)."""
    for executor in executors:
        with contextlib.suppress(Exception):
            executor.shutdown(force=True, exception=PipelineError("the run stopped"))


def _keep_tracebacks_off_the_console() -> None:
    """Ray Data logs a failing task's traceback to stderr; we report the cause in one line instead.

    Ray Data rebuilds its handlers whenever a dataset starts (on its own
    thread), so a filter on them can come too late. Instead, every ERROR
    record of a `ray.data` logger is made at birth with `hide = True`, which
    Ray Data's console filter honours; its session log file still gets the
    full record. `--debug` leaves the console as it is.
    """
    base = logging.getLogRecordFactory()
    if getattr(base, "_embedpipe", False):
        return

    def factory(name, level, *args, **kwargs):
        record = base(name, level, *args, **kwargs)
        if level >= logging.ERROR and name.startswith("ray.data"):
            record.__class__ = _hidden(type(record))
        return record

    factory._embedpipe = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


@functools.lru_cache(maxsize=None)
def _hidden(record_class: type) -> type:
    # A class attribute, not an instance one: Ray Data may still pass extra={"hide": ...} itself.
    return type("HiddenRecord", (record_class,), {"hide": True})


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and every exception behind it (Ray's `cause`, `__cause__`, `__context__`), each once."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        stack += [getattr(e, "cause", None), e.__cause__, e.__context__]


def explain(exc: BaseException) -> EmbedpipeError:
    """The EmbedpipeError behind a Ray failure, or a PipelineError naming the cause."""
    for e in _causes(exc):
        if isinstance(e, EmbedpipeError) and type(e).__module__ == "pipeline.errors":
            return e  # not Ray's dynamic RayTaskError(InputError) wrapper, whose text is a traceback
    text = str(exc).strip().splitlines()
    for line in reversed(text):  # an actor that failed to start carries its cause as text only
        found = _OUR_ERROR_LINE.search(line)
        if found:
            return _ERROR_CLASSES[found.group(1)](found.group(2).strip())
    for line in reversed(text):  # Ray puts the user's exception last
        if line.strip() and not line.startswith(" "):
            return PipelineError(f"the run failed: {line.strip()[:500]}")
    return PipelineError(f"the run failed: {exc.__class__.__name__}")


_NODE_LOST_TEXT = re.compile(r"The actor \w+ is unavailable|NodeDiedError")
_ACTOR_LOST_TEXT = re.compile(r"The actor died|ActorDiedError")
_ERROR_CLASSES = {"UsageError": UsageError, "InputError": InputError, "PipelineError": PipelineError}
_OUR_ERROR_LINE = re.compile(r"pipeline\.errors\.(UsageError|InputError|PipelineError): (.+)$")
