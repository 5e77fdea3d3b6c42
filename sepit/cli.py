"""The ``sepit`` command: one sub-command per platform capability.

Each sub-command lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; this file only wires names to modules (imported lazily, so ``sepit --help``
stays fast and a missing optional dependency only breaks its own command).  The commands that
run one step come from the step registry (:mod:`sepit.config.steps`), the one the pipeline uses.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from sepit.config.steps import STEPS

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    **{step.command: (step.module, step.help) for step in STEPS.values()},
    "pipeline": ("sepit.pipeline", "the whole pipeline: preprocess -> dataset -> stages 0-2 -> evaluate"),
    "score": ("sepit.evaluation.score_predictions", "score an existing predictions file"),
    "serve": ("sepit.serve.app", "Ray Serve HTTP endpoint over an exported model"),
    "plan": ("sepit.plan", "per-GPU memory and divisibility checks of a stage before launch"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sepit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_mod, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser = build_parser()
        if argv and argv[0] not in ("-h", "--help"):
            parser.print_usage(sys.stderr)
            print(f"sepit: unknown command {argv[0]!r}; choose one of {sorted(COMMANDS)}", file=sys.stderr)
            return 2
        parser.print_help()
        return 0
    name, rest = argv[0], argv[1:]
    module_name, help_ = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            print(f"sepit {name}: not available in this build ({exc})", file=sys.stderr)
            return 2
        raise
    parser = argparse.ArgumentParser(prog=f"sepit {name}", description=help_)
    module.add_arguments(parser)
    parser.add_argument("--verbose", action="store_true",
                        help="also show Ray/DeepSpeed/MLflow output on the console (always kept in RUN/logs/)")
    args = parser.parse_args(rest)
    from sepit.console import set_verbose

    set_verbose(args.verbose)
    return int(module.run(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
