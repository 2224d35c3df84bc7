"""Command lines: `apiana-lab inspect|synth` and `chatgpt-export-v2`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import traceback
from pathlib import Path

from .engine_log import EngineLog
from .errors import ApianaError, ExportError

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED_CHUNKS, EXIT_BAD_INPUT = 0, 1, 2
EXIT_BUG = 1  # an unexpected exception: the traceback is shown, finished summaries are kept


def _setup_logging(verbose: bool) -> None:
    # Our own records and anyone's errors go to the terminal. Other libraries' records go to
    # stderr, which is the engine log while an engine runs (EngineLog): their start-up warnings
    # say nothing about the run and would land in the middle of the progress bar.
    if not logging.getLogger().handlers:  # as basicConfig: logging set up by a host program stays as it is
        ours = logging.StreamHandler(_terminal())
        ours.addFilter(_ours_or_error)
        theirs = logging.StreamHandler(sys.stderr)
        theirs.addFilter(lambda record: not _ours_or_error(record))
        logging.basicConfig(
            level=logging.INFO if verbose else logging.WARNING,
            format="%(levelname)s %(name)s: %(message)s",
            handlers=[ours, theirs],
        )
    # vLLM's INFO lines go to the engine log (and, with -v, to the terminal as well); never to
    # stdout, its default, where --json prints.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _terminal():
    """A stream on the terminal's stderr that stays there while an EngineLog holds fd 2."""
    try:
        return open(os.dup(sys.stderr.fileno()), "w", buffering=1, encoding=sys.stderr.encoding, errors="replace")
    except (AttributeError, OSError, ValueError):  # no real fd 2 (an embedding host): plain stderr
        return sys.stderr


def _ours_or_error(record: logging.LogRecord) -> bool:
    return record.name.partition(".")[0] == __name__.partition(".")[0] or record.levelno >= logging.ERROR


def _engine_log_note(path) -> str:
    """The closing line that names the engine log ("" when the engines said nothing)."""
    return f"engine log (the engines' own output): {path}" if os.path.exists(path) else ""


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def inspect_export(paths: str | os.PathLike | list, chunk_size: int = 3500) -> dict:
    """Totals and per-conversation figures of one export or several merged, as `inspect --json` prints them."""
    from .experiments.profile import profile_export

    return profile_export(paths, chunk_size).inspect_json()


def _print_inspect(result: dict) -> None:
    t = result["totals"]
    print(f"format:             {result['format']}")
    if len(t["inputs"]) > 1:
        for i in t["inputs"]:
            print(f"input:              {i['path']} ({i['format']})")
    print(
        f"conversations:      {t['conversations']} read, {t['skipped']} skipped {t['skipped_by_reason'] or ''}".rstrip()
    )
    print(
        f"                    {t['duplicates']} older duplicates dropped, {t['without_dialogue']} without dialogue, "
        f"{t['fallback_branch']} on a fallback branch"
    )
    print(f"dialogue messages:  {t['dialogue_messages']} {t['dialogue_by_role']}")
    print(f"other entries:      {sum(t['non_dialogue_by_type'].values())} {t['non_dialogue_by_type']}")
    print(f"chunks:             {t['chunks']} of up to {t['chunk_size']} tokens, {t['tokens']} tokens in all")
    print(f"dates:              {t['first_date']} .. {t['last_date']}")
    several = len(t["inputs"]) > 1
    for s in result["skipped"]:
        where = f"{s['input']} #{s['index']}" if several else f"#{s['index']}"
        print(f"skipped: {where} {s.get('id')!r}: {s['reason']}: {s['detail']}")


def main(argv=None) -> int:
    """`apiana-lab`: inspect an export, plan a run, or write a synthetic export."""
    parser = argparse.ArgumentParser(prog="apiana-lab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="count conversations, messages, chunks and tokens in an export")
    p.add_argument(
        "input",
        nargs="+",
        help="conversations.json, the export .zip, a shard folder, or a Claude "
        "export; several are merged by conversation id, the newest version of each kept",
    )
    p.add_argument("--json", action="store_true", help="print one JSON document instead of a summary")
    p.add_argument("--chunk-size", type=int, default=3500, help="tokens per chunk (default 3500)")
    p.add_argument("-v", "--verbose", action="store_true")
    s = sub.add_parser("synth", help="write a realistic synthetic export (no personal data)")
    s.add_argument("--size-mb", type=float, required=True)
    s.add_argument("-o", "--output", required=True, help="file (chatgpt, claude) or folder (chatgpt-sharded)")
    s.add_argument("--format", choices=["chatgpt", "chatgpt-sharded", "claude"], default="chatgpt")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("-v", "--verbose", action="store_true")
    pl = sub.add_parser("plan", help="project how long summarizing a whole export will take, from a measured sample")
    pl.add_argument("input", nargs="+", help="the export(s), as for inspect")
    pl.add_argument("--backend", default="vllm", help=_backend_help("vllm"))
    pl.add_argument("--model", default=None, help="as for chatgpt-export-v2")
    pl.add_argument(
        "--sample", type=int, default=16, help="chunks to measure, spread from shortest to longest (default 16)"
    )
    pl.add_argument("--chunk-size", type=int, default=3500)
    pl.add_argument("--max-length", type=int, default=300)
    pl.add_argument("--batch-size", type=int, default=None)
    pl.add_argument("--max-workers", type=int, default=None)
    _add_engine_flags(pl)
    pl.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    pl.add_argument("-v", "--verbose", action="store_true")
    r = sub.add_parser(
        "results", help="list notebook runs under results/ with key figures and verdicts; rewrite results/README.md"
    )
    r.add_argument("--json", action="store_true")
    r.add_argument("--root", default=None, help="the results folder (default: the checkout's results/)")
    r.add_argument(
        "--trust",
        action="store_true",
        help="sign the executed notebooks there that are ours (run here, or "
        "tracked by git unmodified) as trusted, so JupyterLab renders "
        "their saved widgets; others stay untrusted (`jupyter trust PATH`)",
    )
    r.add_argument("-v", "--verbose", action="store_true")
    rv = sub.add_parser(
        "review", help="how good a run's memories are: counts per quality flag, then the worst beside their chunks"
    )
    rv.add_argument("output", help="a chatgpt-export-v2 output folder (apiana.sqlite, summaries.jsonl)")
    rv.add_argument(
        "--flag",
        default=None,
        help="show examples carrying this flag: empty, loop, echo, truncated, wrong_language, not_first_person",
    )
    rv.add_argument("--worst", type=int, default=5, help="how many examples (default 5)")
    rv.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    rv.add_argument("-v", "--verbose", action="store_true")
    n = sub.add_parser("notebook", help="execute notebooks with papermill into results/<notebook>/<run-id>/")
    n.add_argument(
        "name",
        nargs="+",
        help="explore_export, summarize_export, backend_comparison, batch_size_sweep, ab_migration_check, or all",
    )
    n.add_argument(
        "-p",
        "--parameter",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "VALUE"),
        help="override a parameter (VALUE read as JSON when it parses); repeatable",
    )
    n.add_argument("--root", default=None, help="the results folder (default: the checkout's results/)")
    n.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        if args.command == "plan":
            return _plan(args)
        if args.command == "results":
            return _results(args)
        if args.command == "notebook":
            return _notebook(args)
        if args.command == "review":
            from .experiments.review import format_review, review

            result = review(args.output, args.flag, args.worst)
            if args.json:
                json.dump(result, sys.stdout, ensure_ascii=False, default=str)
                sys.stdout.write("\n")
            else:
                print(format_review(result))
            return EXIT_OK
        if args.command == "inspect":
            result = inspect_export(args.input, args.chunk_size)
            if args.json:
                json.dump(result, sys.stdout, ensure_ascii=False, default=str)
                sys.stdout.write("\n")
            else:
                _print_inspect(result)
        else:
            from .export.synth import write_synthetic_export

            stats = write_synthetic_export(args.output, size_mb=args.size_mb, format=args.format, seed=args.seed)
            print(
                f"wrote {stats.path}: {stats.bytes / 1e6:.1f} MB, {stats.conversations} conversations, "
                f"{stats.messages} messages in {stats.seconds:.1f} s"
            )
    except ApianaError as e:
        return _fail(str(e))
    return EXIT_OK


def _engine_flags() -> dict:
    """Every backend's declared engine options, by constructor argument: (option, the backends that take it).

    A backend that cannot be imported here offers no flags; `--engine-arg` still reaches it.
    """
    from .providers.registry import backends

    merged: dict = {}
    seen: set = set()
    for name, backend in backends().items():
        try:
            cls = backend.load()
        except ApianaError:
            continue
        if cls in seen:  # one class under two names (openai, server): name it once
            continue
        seen.add(cls)
        for option in cls.engine_options:
            merged.setdefault(option.name, (option, []))[1].append(name)
    return merged


def _add_engine_flags(parser) -> None:
    engine = parser.add_argument_group("engine options (each backend declares its own; checked against the chosen one)")
    for option, names in _engine_flags().values():
        help_ = f"{', '.join(names)}: {option.help}"
        if option.type is bool:
            engine.add_argument(option.flag, dest=option.name, action="store_true", default=None, help=help_)
        else:
            engine.add_argument(option.flag, dest=option.name, type=option.type, default=None, help=help_)
    engine.add_argument(
        "--engine-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other constructor argument of the backend (vllm: any vllm.EngineArgs field); "
        "VALUE is read as JSON when it parses",
    )


def _backend_help(default: str) -> str:
    from .providers.registry import describe_backends

    return f"the backend (default {default}): {describe_backends()}"


def _engine_options(args) -> dict:
    """The engine flags the user gave, as constructor arguments (ValueError on a malformed --engine-arg)."""
    options = {name: getattr(args, name) for name in _engine_flags() if getattr(args, name, None) is not None}
    options.update(parse_engine_args(args.engine_arg))
    return options


def _plan(args) -> int:
    from .experiments.plan import format_plan, plan_export

    if args.sample < 1:
        return _fail("--sample must be at least 1")
    # stdout carries the plan alone (with --json, one JSON document); what the engine prints,
    # here and in its child processes, goes to a log of this run instead.
    fd, log_path = tempfile.mkstemp(prefix="apiana-plan-", suffix=".engine.log")
    os.close(fd)
    try:
        with EngineLog(log_path, echo=args.verbose):
            plan = plan_export(
                args.input,
                args.backend,
                args.model,
                sample=args.sample,
                chunk_size=args.chunk_size,
                max_length=args.max_length,
                batch_size=args.batch_size,
                max_workers=args.max_workers,
                engine_options=_engine_options(args),
            )
    except (ApianaError, ValueError) as e:
        return _fail("\n".join(filter(None, [str(e), _engine_log_note(log_path)])))
    if args.json:
        json.dump(plan, sys.stdout, default=str)
        sys.stdout.write("\n")
    else:
        print(format_plan(plan))
    if _engine_log_note(log_path):
        print(_engine_log_note(log_path), file=sys.stderr)
    return EXIT_OK


def _results(args) -> int:
    from .experiments.results import default_root, list_runs, trust_ours, write_index

    root = Path(args.root or default_root())
    checked, untrusted = False, []
    notebooks = sorted(root.glob("*/*/*.ipynb"))
    if notebooks:
        try:
            trusted, untrusted = trust_ours(notebooks, sign=args.trust)
            checked = True
        except ImportError as e:  # nbformat comes with the notebooks extra; the listing does without it
            if args.trust:
                return _fail(f"{e}; install it with: pip install 'apiana-lab[notebooks]'")
        if args.trust:
            print(
                f"trusted {len(trusted)} executed notebooks (run here, or committed unmodified); "
                f"{len(untrusted)} from elsewhere left untrusted",
                file=sys.stderr,
            )
    runs = list_runs(root)
    index = write_index(root)
    if args.json:
        untrusted_names = {str(p.relative_to(root)) for p in untrusted}
        for r in runs:
            r["trusted"] = r["executed_notebook"] not in untrusted_names if checked and r["executed_notebook"] else None
        json.dump(runs, sys.stdout, default=str)
        sys.stdout.write("\n")
        return EXIT_OK
    if not runs:
        print(f"no notebook runs yet; run `make notebooks` (index: {index})")
        return EXIT_OK
    for r in runs:
        key = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in r["key"].items())
        verdict = f" [{r['verdict']}]" if r["verdict"] else ""
        print(f"{r['notebook']:<20} {r['run_id']:<26} {key}{verdict}")
    print(f"index: {index}")
    if untrusted:
        print(
            f"untrusted: {len(untrusted)} executed notebook(s) neither run here nor committed unmodified; JupyterLab "
            "shows their widgets as text and runs none of their HTML or JavaScript:"
        )
        for path in untrusted:
            print(f"  {path}")
        print("read one first, then trust it deliberately with: jupyter trust PATH")
    return EXIT_OK


def _notebook(args) -> int:
    from .experiments.results import NOTEBOOKS, execute

    names = list(NOTEBOOKS) if args.name == ["all"] else args.name
    unknown = [n for n in names if n.removesuffix(".ipynb") not in NOTEBOOKS]
    if unknown:
        return _fail(f"unknown notebook {unknown[0]!r}; notebooks: {', '.join(NOTEBOOKS)}, or all")
    parameters = parse_engine_args([f"{k}={v}" for k, v in args.parameter])
    failed = []
    for name in names:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        try:
            print(execute(name, parameters, args.root))
        except Exception as e:  # papermill's error names the failing cell; the executed notebook is kept
            failed.append(name)
            print(
                f"{name} failed: {str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}",
                file=sys.stderr,
            )
    return EXIT_FAILED_CHUNKS if failed else EXIT_OK


def _batch_size(value: str) -> int | str:
    """--batch-size: "auto" or a whole number (checked to be >= 1 with the other numbers)."""
    if value.strip().lower() == "auto":
        return "auto"
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'auto' or a whole number, not {value!r}") from None


def _auto_note(result: dict) -> str:
    """How auto went, for the closing line ("" for a fixed batch size)."""
    if result.get("batch_size_mode") != "auto":
        return ""
    final = result.get("batch_size_final")
    return f" (auto, ended at {final})" if final not in (None, result["batch_size"]) else " (auto)"


def parse_engine_args(pairs: list[str]) -> dict:
    """KEY=VALUE pairs as a dict; a value that parses as JSON is taken as JSON (numbers, true, lists)."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--engine-arg needs KEY=VALUE, got {pair!r}")
        try:
            options[key.strip().replace("-", "_")] = json.loads(value)
        except ValueError:
            options[key.strip().replace("-", "_")] = value
    return options


def export_v2_main(argv=None) -> int:
    """`chatgpt-export-v2`: summarize a whole export with a local model."""
    parser = argparse.ArgumentParser(
        prog="chatgpt-export-v2",
        description="Turn ChatGPT or Claude exports into first-person reflective summaries with a local LLM.",
    )
    parser.add_argument(
        "-i",
        "--input",
        required=True,
        action="append",
        help="conversations.json, the export .zip, a shard folder, or a Claude export; "
        "give -i several times to merge exports (newest version of each conversation wins)",
    )
    parser.add_argument("-o", "--output", required=True, help="folder for apiana.sqlite, summaries.jsonl and run.json")
    parser.add_argument("--backend", default="vllm", help=_backend_help("vllm"))
    parser.add_argument(
        "--model",
        default=None,
        help="local HF model folder (default: the bundled SmolLM2-135M-Instruct); "
        "with --backend openai, the server's model name (default: its first)",
    )
    parser.add_argument(
        "--batch-size",
        type=_batch_size,
        default="auto",
        help="auto (default): tuned from the measured output tokens/s while the run goes (transformers: prompts "
        "per batch; openai: requests in flight, up to --max-workers; vllm: the engine's own window); or N: "
        "vllm: requests in flight; transformers: prompts per batch; openai: unused",
    )
    parser.add_argument(
        "--max-workers",
        type=int,
        default=None,
        help="openai: requests in flight (default 32; with --batch-size auto, the most it may reach, default 256); "
        "transformers: threads feeding batches (default 2); vllm: unused (one thread owns the engine)",
    )
    parser.add_argument("--chunk-size", type=int, default=3500, help="tokens per chunk")
    parser.add_argument("--chunk-method", choices=["tokens", "messages"], default="tokens")
    parser.add_argument("--max-length", type=int, default=300, help="most new tokens per summary")
    parser.add_argument("--limit", type=int, default=None, help="only the first N chunks")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="> 1 discourages repeated tokens (vllm, transformers, a vLLM server); default 1 (off)",
    )
    parser.add_argument(
        "--redo",
        default=None,
        metavar="FLAGS",
        help="redo only the chunks whose kept summary carries one of these quality flags (comma-"
        "separated: empty, loop, echo, truncated, wrong_language, not_first_person; or 'flagged' "
        "for any), with this command's options; both versions stay, the one with fewer flags is kept",
    )
    _add_engine_flags(parser)
    scale = parser.add_argument_group(
        "Ray (summarize on a cluster's actors; reading, chunking and the store stay here)"
    )
    scale.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run on the Ray cluster at ADDRESS (HOST:PORT of its head); without ADDRESS: RAY_ADDRESS, "
        "else a new local cluster",
    )
    scale.add_argument(
        "--replicas",
        type=int,
        default=None,
        help="model replicas (default: one per GPU, or one per node when the cluster has no GPUs)",
    )
    scale.add_argument(
        "--replica-gpus",
        type=float,
        default=None,
        help="GPUs per replica (default: 1 when the cluster has GPUs, else 0)",
    )
    scale.add_argument("--replica-cpus", type=float, default=None, help="CPUs per replica (default 1)")
    parser.add_argument(
        "--sequential", action="store_true", help="the old one-at-a-time summarizer (also APIANA_PARALLEL=0)"
    )
    parser.add_argument("--fresh", action="store_true", help="ignore summaries from earlier runs")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    for name in ("batch_size", "max_workers", "max_length"):
        value = getattr(args, name)
        if isinstance(value, int) and value < 1:
            return _fail(f"--{name.replace('_', '-')} must be at least 1")
    from .chunking import check_chunk_size
    from .errors import ConfigError

    try:
        check_chunk_size(args.chunk_size)
    except ConfigError as e:
        return _fail(f"--chunk-size: {e}")
    if args.limit is not None and args.limit < 0:
        return _fail("--limit must be >= 0")
    if args.ray is None and (args.replicas, args.replica_gpus, args.replica_cpus) != (None, None, None):
        return _fail("--replicas, --replica-gpus and --replica-cpus need --ray")
    try:
        engine_options = _engine_options(args)
    except ValueError as e:
        return _fail(str(e))
    sequential = args.sequential or os.environ.get("APIANA_PARALLEL", "1").strip() in ("0", "false", "no")

    from .errors import FatalProviderError
    from .pipeline import RunConfig, run_export
    from .progress import TerminalProgress
    from .store import SQLiteStore

    config = RunConfig(
        input=args.input if len(args.input) > 1 else args.input[0],
        output=args.output,
        backend=args.backend,
        model=args.model,
        batch_size=args.batch_size,
        max_workers=args.max_workers,
        chunk_size=args.chunk_size,
        chunk_method=args.chunk_method,
        max_length=args.max_length,
        limit=args.limit,
        sequential=sequential,
        fresh=args.fresh,
        temperature=args.temperature,
        seed=args.seed,
        engine_options=engine_options,
        redo=args.redo.split(",") if args.redo is not None else None,
        repetition_penalty=args.repetition_penalty,
        executor="local" if args.ray is None else "ray",
        ray_address=args.ray or None,
        replicas=args.replicas,
        replica_gpus=args.replica_gpus,
        replica_cpus=1.0 if args.replica_cpus is None else args.replica_cpus,
    )
    held = SQLiteStore.peek(os.path.join(args.output, "apiana.sqlite"))
    if held:
        print(
            f"{args.output} already holds {held} summaries; those made with the same model, prompt and options "
            f"are reused, nothing else is touched.",
            file=sys.stderr,
        )
    bar = TerminalProgress("summarizing", disable=args.no_progress)
    engine_log = EngineLog(os.path.join(args.output, "engine.log"), echo=args.verbose)
    try:
        with engine_log:
            bar.file = engine_log.console  # the bar is ours: it stays on the terminal
            result = run_export(config, progress=bar)
    except ExportError as e:
        return _fail(
            f"{e}\nCheck the path and that it is a ChatGPT or Claude export "
            "(conversations.json, the .zip, or a shard folder)."
        )
    except FatalProviderError as e:
        bar.close()
        print(
            f"error: {e}\nThe run stopped; every summary finished before this is kept. Fix the above and rerun.",
            file=sys.stderr,
        )
        if _engine_log_note(engine_log.path):
            print(_engine_log_note(engine_log.path), file=sys.stderr)
        return EXIT_BAD_INPUT
    except ApianaError as e:
        return _fail("\n".join(filter(None, [str(e), _engine_log_note(engine_log.path)])))
    except KeyboardInterrupt:
        bar.close()
        print("interrupted: every finished summary is kept; rerun the same command to resume.", file=sys.stderr)
        return 130
    except Exception:  # not one of ours: a bug, here or in a backend; its traceback says where
        bar.close()
        traceback.print_exc()
        store = os.path.join(args.output, "apiana.sqlite")
        print(
            f"error: the run stopped on an unexpected error (a bug; the traceback above says where). Every summary "
            f"finished before it is kept: {SQLiteStore.peek(store)} in {store}. Rerun the same command to resume.",
            file=sys.stderr,
        )
        if _engine_log_note(engine_log.path):
            print(_engine_log_note(engine_log.path), file=sys.stderr)
        return EXIT_BUG
    finally:
        bar.close()
    if sequential:
        mode = "sequential"
    elif result["mode"] == "stream":
        mode = f"streaming, {result['batch_size']} in flight"
    elif result["mode"] == "batch":
        mode = f"parallel, batch {result['batch_size']}{_auto_note(result)}, {result['max_workers']} workers"
    elif result["mode"] and result.get("batch_size_mode") == "auto":
        mode = f"parallel, {result['batch_size']} requests in flight{_auto_note(result)}"
    elif result["mode"]:
        mode = f"parallel, {result['max_workers']} requests in flight"
    else:  # on Ray with nothing left to do, no replica started
        mode = "nothing left to summarize"
    if "ray" in result:
        cluster = result["ray"]
        nodes = len({r["node"] for r in cluster["replica_runs"]})
        mode += f"; on Ray, {cluster['replicas']} replicas, {nodes} of {len(cluster['nodes'])} nodes did work"
    dup = f", {result['duplicates']} duplicate conversations dropped" if result["duplicates"] else ""
    print(
        f"{result['chunks_total']} chunks from {result['conversations_read']} conversations "
        f"({result['conversations_skipped']} skipped{dup}): {result['summaries_computed']} summarized, "
        f"{result['summaries_reused']} reused, {result['failed']} failed [{result['backend']}, {mode}]"
    )
    if result["summaries_computed"]:
        print(
            f"{result['completion_tokens_per_s']:.1f} completion tokens/s, {result['chunks_per_s']:.2f} chunks/s; "
            f"model load {result['load_seconds']:.1f} s, whole run {result['wall_seconds']:.1f} s"
            + (
                f" (replicas started and loaded the model in {result['ray']['startup_seconds']:.1f} s of it)"
                if "ray" in result and result["ray"]["startup_seconds"] is not None
                else ""
            )
        )
    if result.get("summaries_with_estimated_tokens"):
        print(
            f"token counts of {result['summaries_with_estimated_tokens']} summaries are estimates: the "
            f"{result['backend']} backend does not report them (about four characters a token)"
        )
    quality = result["quality"]
    if quality["count"]:
        worst = sorted(((f["count"], name) for name, f in quality["flags"].items() if f["count"]), reverse=True)
        print(
            f"quality: {quality['flagged']} of {quality['count']} summaries flagged ({quality['flagged_share']:.0%})"
            + (": " + ", ".join(f"{name} {count}" for count, name in worst) if worst else "")
            + (f"; see `apiana-lab review {args.output}`" if quality["flagged"] else "")
        )
    print(
        f"results: {os.path.join(args.output, 'summaries.jsonl')}, {os.path.join(args.output, 'apiana.sqlite')}, "
        f"{os.path.join(args.output, 'run.json')}"
    )
    if _engine_log_note(engine_log.path):
        print(_engine_log_note(engine_log.path))
    if result["failed"]:
        print(f"{result['failed']} chunks failed; rerun the same command to retry only those.", file=sys.stderr)
        return EXIT_FAILED_CHUNKS
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
