"""Command line: `embedpipe embed | mine | rerank | search | info` (also `python -m pipeline`).

The flags (and search's arguments) of embed, mine, rerank and search, their groups, help and defaults
are made from the fields of their config classes (`pipeline.config.options`); only --config, --dry-run
and info's are written here.

Exit codes: 0 success; 2 bad usage or bad input, with one line on stderr;
1 runtime failure, with the cause named. `--debug` adds the traceback.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import signal
import sys
import threading
import traceback
from typing import NoReturn, Sequence

from pipeline.config import CONFIGS, GROUPS, Option, load_config, options
from pipeline.engine import interrupts
from pipeline.errors import EmbedpipeError, UsageError

PROG = "embedpipe"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, like every other usage error
        raise UsageError(message)


def _command_parser(sub, command: str, summary: str) -> argparse.ArgumentParser:
    """The subcommand's parser: --config, then one flag per field of its config, in the field's group."""
    p = sub.add_parser(command, help=summary, description=summary[0].upper() + summary[1:] + ".")
    p.add_argument("--config", metavar="FILE",
                   help=f"YAML file of options (keys as below, '_' for '-'), at the top level or under its "
                        f"`{command}:` section; flags override it.")
    for title in GROUPS:
        members = [option for option in options(CONFIGS[command]) if option.group == title]
        if members:
            group = p.add_argument_group(title)
            for option in members:
                _add_flag(group, option)
    return p


_TYPES = {"integer": int, "number": float}
_METAVARS = {"list": "NAME,...", "mapping": "JSON"}


def _add_flag(group, option: Option) -> None:
    """A config field as a flag: help = its docstring and default. A boolean is --flag (and --no-flag where
    None means 'not set' or the default is true), a list is comma-separated, a mapping a JSON object. Not given: None."""
    text = option.help.replace("%", "%%")
    if option.positional:  # optional here, so that --config may give it; the config says what is required
        group.add_argument(option.name, nargs="?", metavar=option.flag, help=text)
        return
    if option.kind == "boolean":
        group.add_argument(option.flag, dest=option.name, action="store_const", const=True, help=text)
        if option.default is None or option.default is True:
            group.add_argument("--no-" + option.flag[2:], dest=option.name, action="store_const", const=False,
                               help=f"The opposite of {option.flag}.")
        return
    group.add_argument(option.flag, dest=option.name, type=_TYPES.get(option.kind), metavar=_METAVARS.get(option.kind),
                       help=text)


def _embed_parser(sub) -> None:
    p = _command_parser(sub, "embed", "embed documents into Parquet vectors")
    p.add_argument("--dry-run", action="store_true",
                   help="Print the shards, estimated documents, actor pools and duration; embed nothing.")


def _mine_parser(sub) -> None:
    _command_parser(sub, "mine", "mine the most similar pairs of an embeddings directory")


def _rerank_parser(sub) -> None:
    _command_parser(sub, "rerank", "score mined pairs with a cross-encoder and sort them by that score")


def _search_parser(sub) -> None:
    p = _command_parser(sub, "search", "exact top-k documents by cosine for a query, over an embeddings directory")
    p.usage = ("embedpipe search EMBEDDINGS QUERY [--top-k K] [--texts INPUT] [options]\n"
               "       embedpipe search EMBEDDINGS --queries FILE --output DIR [--top-k K] [options]")


def _info_parser(sub) -> None:
    p = sub.add_parser("info", help="print an output's manifest and a few rows",
                       description="Print an output's manifest and a few rows.")
    p.add_argument("path", help="An output directory (local or s3://) written by embed, mine, rerank or search.")
    p.add_argument("--rows", type=int, default=3, help="Rows to show. (default: 3)")
    p.add_argument("--pairs", type=int, default=0,
                   help="Also show the N most similar pairs, computed here (small outputs). (default: 0)")
    p.add_argument("--pairs-in", metavar="GLOB",
                   help="With --pairs: only among the rows whose id matches GLOB, e.g. 'en.txt:*' (one input file).")
    p.add_argument("--storage-options", metavar="JSON",
                   help="fsspec options for s3:// paths (endpoint, credentials), a JSON object; never logged.")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Distributed batch embedding on Ray.")
    parser.add_argument("--debug", action="store_true", help="Show tracebacks of errors.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    _embed_parser(sub)
    _mine_parser(sub)
    _rerank_parser(sub)
    _search_parser(sub)
    _info_parser(sub)
    return parser


def _load_config(args: argparse.Namespace):
    """The subcommand's config from defaults <- --config <- its flags."""
    cls = CONFIGS[args.command]
    flags = {}
    for option in options(cls):
        value = getattr(args, option.name)
        flags[option.name] = _json_object(option.flag, value) if option.kind == "mapping" else value
    return load_config(cls, args.config, **flags)


def cmd_embed(args: argparse.Namespace) -> int:
    from pipeline import api

    config = _load_config(args)
    if args.dry_run:
        from pipeline.commands.dryrun import dry_run

        print(dry_run(config))
        return 0
    api.embed(config, report=_summary(config.quiet))
    return 0


def _json_object(flag: str, text: str | None) -> dict | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise UsageError(f"{flag} must be a JSON object") from None
    if not isinstance(value, dict):
        raise UsageError(f"{flag} must be a JSON object")
    return value


def cmd_mine(args: argparse.Namespace) -> int:
    from pipeline import api

    config = _load_config(args)
    api.mine(config, report=_summary(config.quiet))
    return 0


def cmd_rerank(args: argparse.Namespace) -> int:
    from pipeline import api

    config = _load_config(args)
    api.rerank(config, report=_summary(config.quiet))
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from pipeline import api

    config = _load_config(args)
    if config.queries and not config.output:
        raise UsageError("--queries needs --output DIR: the results of a query file are written to "
                         "DIR/results.parquet (give one QUERY to print its results)")
    if config.texts and config.output:
        raise UsageError("--texts prints the hits' texts; results.parquet holds their ids: drop --texts with --output")
    result = api.search(config)
    if not config.output:
        print("\n".join(result.lines()), flush=True)
    elif not config.quiet:
        print(result.summary_line(), flush=True)
    return 0


def _summary(quiet: bool):
    """Print each step's summary line as it ends (embed, mine, rerank), unless quiet."""
    return None if quiet else (lambda result: print(result.summary_line(), flush=True))


def cmd_info(args: argparse.Namespace) -> int:
    from pipeline.commands.info import show_info

    show_info(args.path, rows=args.rows, pairs=args.pairs, storage_options=_json_object("--storage-options", args.storage_options),
              pairs_in=args.pairs_in)
    return 0


def job_main(command: str, argv: Sequence[str]) -> int:
    """What jobs/embed.py, jobs/mine.py and jobs/rerank.py run under `ray job submit`: `command` on the cluster
    the job runs on (RAY_ADDRESS, else 'auto'). A job never starts a cluster of its own, so an
    empty --ray-address is refused."""
    args = list(argv)
    given = [args[i + 1] if a == "--ray-address" and i + 1 < len(args) else a.partition("=")[2]
             for i, a in enumerate(args) if a == "--ray-address" or a.startswith("--ray-address=")]
    if any(not g.strip() for g in given):
        print(f"{PROG}: error: --ray-address is empty: a job joins its cluster and never starts one", file=sys.stderr)
        return 2
    interrupts.install()  # `ray job stop` sends SIGTERM
    return main([command, "--ray-address", os.environ.get("RAY_ADDRESS") or "auto", *args])


def run() -> NoReturn:
    """The `embedpipe` command (and `python -m pipeline`): main(), then out of the process with its code.

    Everything Python registered for exit runs (Ray's shutdown, logging's flush, finalizers),
    then the process ends without the interpreter's native teardown: Arrow's thread pools,
    destroyed there while a worker thread is alive, intermittently abort a command that has
    finished its work ("terminate called without an active exception", exit -6; CI saw it
    on `embedpipe info`; apache/arrow#34314).
    """
    interrupts.install()  # Ctrl-C and SIGTERM: one line, exit 130 / 143 (pipeline.engine.interrupts)
    try:
        code = main()
    except SystemExit as exc:  # --help
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    for signum in interrupts.SIGNALS:  # the command is over: a signal now just ends the exit
        signal.signal(signum, signal.SIG_DFL)
    _exit_now(code)


def _exit_now(code: int) -> NoReturn:
    main_thread = threading.main_thread()
    for thread in threading.enumerate():  # what a normal exit waits for first
        if thread is not main_thread and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can reach it
            pass
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    previous = os.environ.get("EMBEDPIPE_DEBUG")
    if debug:  # read by the engine (pipeline.engine.execution); restored below so a library caller's later runs are not affected
        os.environ["EMBEDPIPE_DEBUG"] = "1"
    try:
        return _main(build_parser(), argv, debug)
    finally:
        if previous is None:
            os.environ.pop("EMBEDPIPE_DEBUG", None)
        else:
            os.environ["EMBEDPIPE_DEBUG"] = previous


def _main(parser: argparse.ArgumentParser, argv: Sequence[str] | None, debug: bool) -> int:
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        commands = {"embed": cmd_embed, "mine": cmd_mine, "rerank": cmd_rerank, "search": cmd_search, "info": cmd_info}
        return commands[args.command](args)
    except EmbedpipeError as exc:
        if debug:
            traceback.print_exc()
        message = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]  # Ray may append notes
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # in a process that did not install pipeline.engine.interrupts (a library caller)
        print(interrupts.stop_line(signal.SIGINT), file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - last line of defence: name the cause, exit 1
        if debug:
            traceback.print_exc()
        first = (str(exc).strip().splitlines() or [""])[0]
        print(f"{PROG}: error: {exc.__class__.__name__}: {first} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1

if __name__ == "__main__":  # pragma: no cover
    run()
