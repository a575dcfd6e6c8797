"""The command line: every option is generated from the config dataclasses (config.py), so a
default or a help text lives in one place. `--config run.yaml` loads a whole config and flags
override it. Only invocation options (--config, --resume, --overwrite, --quiet, --debug, and
export-gguf's RUN_DIR) are declared here.

Every user error arrives here as a LayerpruneError and leaves as one line on
stderr with exit code 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
from pathlib import Path

from .config import CompareConfig, EvalConfig, ExportConfig, PruneConfig, ScoreConfig
from .options import expand_shorthands, field_types, flag_of, from_dict, merge_values, read_yaml
from .errors import LayerpruneError, write_error

EXIT_USER_ERROR = 2
PREFIX = "config:"


def add_config_options(parser: argparse.ArgumentParser, cls, path: str = "", title: str | None = None) -> None:
    """One option per field, nested sections included; unset options stay out of the namespace,
    so YAML values and defaults are only overridden by flags actually given."""
    group = parser.add_argument_group(title or cls.__name__)
    hints = field_types(cls)
    defaults = cls() if path else None
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            add_config_options(parser, hints[f.name], f"{path}{f.name}.", f.name)
            continue
        default = getattr(defaults, f.name) if defaults is not None else f.default
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        kwargs = dict(dest=f"{PREFIX}{path}{f.name}", default=argparse.SUPPRESS,
                      help=f.metadata.get("help", "") + ("" if default is None else f" (default: {shown})"))
        if hints[f.name] is bool:
            group.add_argument(flag_of(cls, f.name), action=argparse.BooleanOptionalAction, **kwargs)
        else:
            group.add_argument(flag_of(cls, f.name), metavar=f.name.upper(), **kwargs)


def config_from_args(cls, args: argparse.Namespace):
    """defaults < --config YAML < flags."""
    values = expand_shorthands(cls, read_yaml(args.config)) if args.config else {}
    for dest, value in vars(args).items():
        if dest.startswith(PREFIX):
            *sections, name = dest[len(PREFIX):].split(".")
            nested = {name: value}
            for section in reversed(sections):
                nested = {section: nested}
            values = merge_values(values, nested)
    return from_dict(cls, values)


def _command(sub, name: str, cls, help: str, description: str | None = None) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=description or help)
    p.add_argument("--config", default=None, help="a YAML file of options (nested data: and heal: sections); "
                                                   "flags override it")
    p.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    add_config_options(p, cls, title="run")
    p.set_defaults(config_class=cls)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="layerprune", description="Remove transformer layers one at a time, "
                                     "chosen by measured importance, and heal by distillation from the original.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = _command(sub, "prune", PruneConfig, "prune a model and save the result",
                 "Score every layer, remove the least important, heal, repeat.")
    p.add_argument("--resume", action="store_true", help="continue the unfinished run in --out (an error if none)")
    p.add_argument("--overwrite", action="store_true", help="delete what --out holds and start afresh")
    _command(sub, "score", ScoreConfig, "print the importance of every layer (original indices)")
    _command(sub, "eval", EvalConfig, "evaluate a model on held-out tasks (against a teacher)")
    _command(sub, "compare", CompareConfig, "the paper's method against the baselines, with and without healing",
             "Runs ShortGPT (one-shot BI), iterative BI, angular block removal (Gromov et al.), SLEB-style "
             "iterative NLL and the paper's method on the same model, data and budgets; writes compare.json, "
             "compare.md and compare.png.")
    p = _command(sub, "export-gguf", ExportConfig, "write a finished run's model as GGUF, from the GGUF it started "
                 "from", "Copies the source GGUF's metadata and unchanged tensors bit for bit, renumbered past the "
                 "cut, and quantises the tensors the run changed back to their type (else Q8_0).")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the --out folder of a finished prune run")
    return parser


def run_prune(config: PruneConfig, args) -> int:
    from .pipeline import prune

    prune(config, progress=not args.quiet, resume=args.resume, overwrite=args.overwrite)
    return 0


def run_score(config: ScoreConfig, args) -> int:
    from .api import score

    rows = score(config, progress=not args.quiet)
    ranked = sorted(range(len(rows)), key=lambda i: rows[i]["score"])
    rank = {i: r + 1 for r, i in enumerate(ranked)}
    print(f"{'layer':>5} {'current':>7} {config.metric:>12} {'rank':>5}  (rank 1 = least important)")
    for i, row in enumerate(rows):
        print(f"{row['layer']:>5} {row['current']:>7} {row['score']:>12.6f} {rank[i]:>5}")
    return 0


def run_eval(config: EvalConfig, args) -> int:
    from .api import evaluate
    from .io import write_json
    from .report import RETENTION_KEYS, retained_cell

    result = evaluate(config, progress=not args.quiet)
    if "bench" in result:
        print(bench_table(result["bench"]))
    teacher = result.get("teacher_tasks", {})
    if result["tasks"]:
        print(f"{'task':<20} {'measure':<12} {'model':>10} {'teacher':>10} retained [95% interval over items]")
    for task, values in result["tasks"].items():
        for key, value in values.items():
            if key in RETENTION_KEYS:
                continue
            ref = teacher.get(task, {}).get(key)
            retained = retained_cell(values, ref, key)
            print(f"{task:<20} {key:<12} {value:>10.4f} {'' if ref is None else f'{ref:10.4f}':>10} {retained}")
    if "quality_retained" in result:
        print(f"quality retained: {result['quality_retained']:.4f} (mean over "
              f"{', '.join(result['quality_retained_tasks'])})")
    if config.json:
        write_json(Path(config.json), result)
    return 0


def bench_table(bench: dict) -> str:
    """The suite's per-task table: scores, retention and chance-corrected retention with their
    paired 95% intervals (or the model's scores alone, without an original)."""
    from .tasks.retention import suite_lines

    return "\n".join(suite_lines(bench))


def run_compare(config: CompareConfig, args) -> int:
    from .compare import compare

    summary = compare(config, progress=not args.quiet)
    print((Path(config.out) / "compare.md").read_text(encoding="utf-8"))
    return 0 if summary["results"] else 1


def run_export(config: ExportConfig, args) -> int:
    from .api import export_gguf

    export_gguf(args.run_dir, config, progress=not args.quiet)  # its log line says what was written
    return 0


COMMANDS = {"prune": run_prune, "score": run_score, "eval": run_eval, "compare": run_compare,
            "export-gguf": run_export}


def configure_logging(quiet: bool) -> None:
    """Our log lines on stderr (warnings only when quiet); the libraries' own chatter and
    transformers' loading bars off, so a run's phases read as one list (bench scripts share it)."""
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    for noisy in ("transformers", "accelerate", "gensim", "smart_open", "datasets", "huggingface_hub", "fsspec",
                  "gguf"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .processes import process_state

    # Under `accelerate launch` or `torchrun` every process runs the command; the main one alone
    # reports progress.
    args.quiet = args.quiet or not process_state(getattr(args, "device", "auto")).is_main_process
    configure_logging(args.quiet)
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        return COMMANDS[args.command](config_from_args(args.config_class, args), args)
    except (LayerpruneError, OSError) as err:
        if args.debug:
            raise
        if isinstance(err, OSError):  # one the writers did not name: the file system's own words
            err = write_error(Path(err.filename or "."), err) or LayerpruneError(
                f"{err.strerror or err}: {err.filename or ''}".rstrip(": "), "check the path and rerun")
        print(f"layerprune: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as stop:
        resumable = " (rerun the same command to resume from the last checkpoint)" if args.command == "prune" else ""
        print(f"layerprune: {stop or 'interrupted'}{resumable}", file=sys.stderr)
        return 143 if isinstance(stop, Terminated) else 130
    finally:
        signal.signal(signal.SIGTERM, previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the run stands: writes in flight clean up as on Ctrl-C."""


def _terminated(signum, frame) -> None:
    raise Terminated("terminated")
