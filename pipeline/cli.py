"""Command line: `embedpipe embed | mine | rerank | info` (also `python -m pipeline`).

Exit codes: 0 success; 2 bad usage or bad input, with one line on stderr;
1 runtime failure, with the cause named. `--debug` adds the traceback.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import sys
import threading
import traceback
from typing import Any, NoReturn, Sequence

from pipeline.errors import EmbedpipeError, UsageError

PROG = "embedpipe"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, like every other usage error
        raise UsageError(message)


def _embed_parser(sub) -> None:
    p = sub.add_parser("embed", help="embed documents into Parquet vectors")
    p.add_argument("--input", help="file, directory, glob or s3:// URI")
    p.add_argument("--output", help="output directory (local or s3://)")
    p.add_argument("--config", help="YAML file of options; flags override it")
    p.add_argument("--model", help="model directory, hub id, or all-MiniLM-L6-v2 (default)")
    p.add_argument("--text-field")
    p.add_argument("--id-field")
    p.add_argument("--keep-columns", help="comma-separated input columns to copy to the output")
    p.add_argument("--pooling", help="cls|mean|max|mean_sqrt_len_tokens|weightedmean|lasttoken, '+' to combine")
    p.add_argument("--normalize", dest="normalize", action="store_const", const=True)
    p.add_argument("--no-normalize", dest="normalize", action="store_const", const=False)
    p.add_argument("--max-seq-length", type=int)
    p.add_argument("--max-batch-tokens", type=int)
    p.add_argument("--prompt-name")
    p.add_argument("--prompt")
    p.add_argument("--device", help="auto|cpu|cuda")
    p.add_argument("--dtype", help="auto|float32|float16|bfloat16|int8 (int8: CPU, ONNX Runtime, close not equal)")
    p.add_argument("--backend", help="auto|torch|onnx: what runs the model on CPU (auto: onnx where its checked graph gives the same vectors)")
    p.add_argument("--output-dtype", help="float32|float16")
    p.add_argument("--sparse-top-k", type=int, help="sparse (SPLADE) models: strongest terms kept per document")
    p.add_argument("--num-encoders", type=int)
    p.add_argument("--encoders-per-node", type=int, help="CPU-only clusters: encoder replicas per node (default: the resource plan's)")
    p.add_argument("--num-tokenizers", type=int)
    p.add_argument("--encoder-threads", type=int)
    p.add_argument("--rows-per-file", type=int)
    p.add_argument("--ray-address", help="empty: local cluster; 'auto': the running cluster")
    p.add_argument("--encoding-errors", help="strict|replace")
    p.add_argument("--on-invalid", help="skip|error: rows with empty, blank or null text (default skip, counted)")
    p.add_argument("--stall-timeout", type=float, help="seconds without progress before the run ends (default 1800; 0: never)")
    p.add_argument("--storage-options", help="JSON object of fsspec options for s3:// paths")
    p.add_argument("--trust-remote-code", action="store_const", const=True)
    p.add_argument("--overwrite", action="store_const", const=True)
    p.add_argument("--quiet", action="store_const", const=True)
    p.add_argument("--mine", action="store_const", const=True, help="then mine the closest pairs of the new vectors")
    p.add_argument("--mine-output", help="where the pairs go (default: OUTPUT-pairs)")
    p.add_argument("--mine-top-k", type=int)
    p.add_argument("--mine-max-pairs", type=int)
    p.add_argument("--mine-threshold", type=float)
    p.add_argument("--rerank-model", help="with --mine: then rerank the mined pairs with this cross-encoder")
    p.add_argument("--rerank-top", type=int, help="rerank only the N best mined pairs (default: all)")
    p.add_argument("--rerank-output", help="where the reranked pairs go (default: MINE_OUTPUT-reranked)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the shards, estimated documents, actor pools and duration; embed nothing")


def _mine_parser(sub) -> None:
    p = sub.add_parser("mine", help="mine the most similar pairs of an embeddings directory")
    p.add_argument("--embeddings", help="directory written by `embedpipe embed`")
    p.add_argument("--output", help="directory for pairs.parquet and _manifest.json")
    p.add_argument("--config", help="YAML file of options (top level or a `mine:` section); flags override it")
    p.add_argument("--top-k", type=int, help="candidates per document (default 100)")
    p.add_argument("--max-pairs", type=int, help="best pairs kept (default 500000)")
    p.add_argument("--threshold", type=float, help="keep pairs scoring at least this cosine")
    p.add_argument("--block-size", type=int, help="rows per block (memory per task ~ 4*N^2 bytes; default 4096)")
    p.add_argument("--ray-address", help="empty: local cluster; 'auto': the running cluster")
    p.add_argument("--storage-options", help="JSON object of fsspec options for s3:// paths")
    p.add_argument("--quiet", action="store_const", const=True)
    p.add_argument("--rerank-model", help="then rerank the pairs with this cross-encoder (see `embedpipe rerank`)")
    p.add_argument("--texts", help="with --rerank-model: the documents embedded (default: the input in the embeddings' manifest)")
    p.add_argument("--rerank-top", type=int, help="rerank only the N best pairs (default: all)")
    p.add_argument("--rerank-output", help="where the reranked pairs go (default: OUTPUT-reranked)")


def _rerank_parser(sub) -> None:
    p = sub.add_parser("rerank", help="score mined pairs with a cross-encoder and sort them by that score")
    p.add_argument("--pairs", help="directory written by `embedpipe mine`")
    p.add_argument("--texts", help="the documents the pairs came from (embed's --input): file, directory, glob or s3:// URI")
    p.add_argument("--model", help="CrossEncoder directory or hub id")
    p.add_argument("--output", help="directory for pairs.parquet (with rerank_score) and _manifest.json")
    p.add_argument("--config", help="YAML file of options (top level or a `rerank:` section); flags override it")
    p.add_argument("--top", type=int, help="rerank only the N best pairs by bi-encoder score (default: all)")
    p.add_argument("--text-field")
    p.add_argument("--id-field")
    p.add_argument("--encoding-errors", help="strict|replace")
    p.add_argument("--max-batch-tokens", type=int)
    p.add_argument("--device", help="auto|cpu|cuda")
    p.add_argument("--dtype", help="auto|float32|float16|bfloat16")
    p.add_argument("--num-encoders", type=int)
    p.add_argument("--encoder-threads", type=int)
    p.add_argument("--block-pairs", type=int, help="pairs per scoring call (default 512 on CPU, 4096 on GPU)")
    p.add_argument("--join-parts", type=int, help="parts of the join by id (default one per 65,536 ids)")
    p.add_argument("--ray-address", help="empty: local cluster; 'auto': the running cluster")
    p.add_argument("--storage-options", help="JSON object of fsspec options for s3:// paths")
    p.add_argument("--trust-remote-code", action="store_const", const=True)
    p.add_argument("--overwrite", action="store_const", const=True, help="replace an earlier rerank output")
    p.add_argument("--quiet", action="store_const", const=True)


def _info_parser(sub) -> None:
    p = sub.add_parser("info", help="print an output's manifest and a few rows")
    p.add_argument("path")
    p.add_argument("--rows", type=int, default=3, help="rows to show")
    p.add_argument("--pairs", type=int, default=0, help="also show the N most similar pairs (small outputs)")
    p.add_argument("--storage-options", help="JSON object of fsspec options for s3:// paths")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Distributed batch embedding on Ray.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    _embed_parser(sub)
    _mine_parser(sub)
    _rerank_parser(sub)
    _info_parser(sub)
    return parser


def cmd_embed(args: argparse.Namespace) -> int:
    from pipeline.config import build_config
    from pipeline.runner import run_embed

    options: dict[str, Any] = {
        k: v for k, v in vars(args).items() if k not in ("command", "config", "debug", "storage_options", "dry_run")
    }
    options["storage_options"] = _storage_options(args.storage_options)
    config = build_config(args.config, **options)
    if config.rerank_model and not args.dry_run:  # a bad cross-encoder is refused before hours of embedding
        from pipeline.cross_encode import check_cross_encoder

        check_cross_encoder(config.rerank_model, config.trust_remote_code)
    if args.dry_run:
        from pipeline.dryrun import dry_run

        print(dry_run(config))
        return 0
    result = run_embed(config)
    if not config.quiet:
        print(result.summary_line())
    if config.mine:
        from pipeline.mine import MineConfig

        return _run_mine(
            MineConfig(
                embeddings=config.output,
                output=config.mine_output or config.output.rstrip("/") + "-pairs",
                top_k=config.mine_top_k,
                max_pairs=config.mine_max_pairs,
                threshold=config.mine_threshold,
                ray_address=config.ray_address,
                quiet=config.quiet,
                storage_options=config.storage_options,
                rerank_model=config.rerank_model,
                texts=config.input if config.rerank_model else None,
                rerank_top=config.rerank_top,
                rerank_output=config.rerank_output,
            ),
            # the rerank reads embed's input as embed did, on the devices embed used
            text_field=config.text_field, id_field=config.id_field, encoding_errors=config.encoding_errors,
            device=config.device, num_encoders=config.num_encoders,
            trust_remote_code=config.trust_remote_code or None,
        )
    return 0


def _storage_options(text: str | None) -> dict | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise UsageError("--storage-options must be a JSON object") from None
    if not isinstance(value, dict):
        raise UsageError("--storage-options must be a JSON object")
    return value


def cmd_mine(args: argparse.Namespace) -> int:
    from pipeline.mine import build_mine_config

    config = build_mine_config(
        args.config,
        embeddings=args.embeddings,
        output=args.output,
        top_k=args.top_k,
        max_pairs=args.max_pairs,
        threshold=args.threshold,
        block_size=args.block_size,
        ray_address=args.ray_address,
        quiet=args.quiet,
        storage_options=_storage_options(args.storage_options),
        rerank_model=args.rerank_model,
        texts=args.texts,
        rerank_top=args.rerank_top,
        rerank_output=args.rerank_output,
    )
    return _run_mine(config)


def _run_mine(config, **rerank_options: Any) -> int:
    """Mine, and print the summary line unless quiet (for `mine` and `embed --mine`); then rerank
    the pairs if the config names a cross-encoder (`rerank_options` override what it would use)."""
    from pipeline.mine import run_mine

    if not config.rerank_model:
        result = run_mine(config)
        if not config.quiet:
            print(result.summary_line())
        return 0
    from pipeline.cross_encode import check_cross_encoder
    from pipeline.rerank import rerank_after_mine
    from pipeline.cluster import ray_session_for

    check_cross_encoder(config.rerank_model, bool(rerank_options.get("trust_remote_code")))  # before mining
    with ray_session_for(config.ray_address, config.quiet):  # one cluster for both steps
        result = run_mine(config)
        if not config.quiet:
            print(result.summary_line())
        return _run_rerank(rerank_after_mine(config, **rerank_options))


def cmd_rerank(args: argparse.Namespace) -> int:
    from pipeline.rerank import build_rerank_config

    options: dict[str, Any] = {k: v for k, v in vars(args).items() if k not in ("command", "config", "debug", "storage_options")}
    options["storage_options"] = _storage_options(args.storage_options)
    return _run_rerank(build_rerank_config(args.config, **options))


def _run_rerank(config) -> int:
    from pipeline.rerank import run_rerank

    result = run_rerank(config)
    if not config.quiet:
        print(result.summary_line())
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from pipeline.info import show_info

    show_info(args.path, rows=args.rows, pairs=args.pairs, storage_options=_storage_options(args.storage_options))
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
    return main([command, "--ray-address", os.environ.get("RAY_ADDRESS") or "auto", *args])


def run() -> NoReturn:
    """The `embedpipe` command (and `python -m pipeline`): main(), then out of the process with its code.

    Everything Python registered for exit runs (Ray's shutdown, logging's flush, finalizers),
    then the process ends without the interpreter's native teardown: Arrow's thread pools,
    destroyed there while a worker thread is alive, intermittently abort a command that has
    finished its work ("terminate called without an active exception", exit -6; CI saw it
    on `embedpipe info`; apache/arrow#34314).
    """
    try:
        code = main()
    except SystemExit as exc:  # --help
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
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
    if debug:  # read by the runner; restored below so a library caller's later runs are not affected
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
        return {"embed": cmd_embed, "mine": cmd_mine, "rerank": cmd_rerank, "info": cmd_info}[args.command](args)
    except EmbedpipeError as exc:
        if debug:
            traceback.print_exc()
        message = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]  # Ray may append notes
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - last line of defence: name the cause, exit 1
        if debug:
            traceback.print_exc()
        first = (str(exc).strip().splitlines() or [""])[0]
        print(f"{PROG}: error: {exc.__class__.__name__}: {first} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1

if __name__ == "__main__":  # pragma: no cover
    run()
