"""The locked evaluation harness. Do not edit: a run with a changed prepare.py is rejected.

    python prepare.py [--quick] [--json] [--model M]   evaluate inference.py (the default command)

Exit status: 0 when the harness gave a decision (whatever it is), 2 for a usage or
settings error, 1 for a failure of the harness itself.
"""

import argparse
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# Subcommands that live in their own harness module: each has add_parser(sub) and run(args).
COMMAND_MODULES = ["harness.log", "harness.profile", "harness.search", "harness.analyze"]


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="prepare.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    ev = sub.add_parser("evaluate", help="measure inference.py and log a row (the default)")
    ev.add_argument("--quick", action="store_true", help="small workload for smoke runs")
    ev.add_argument("--json", action="store_true", help="also print the result as one JSON line, last on stdout")
    ev.add_argument("--model", help="offline name, local mlx-lm directory or Hugging Face repo id")
    ev.add_argument("--apply", action="store_true",
                    help="after REVERT/CRASH/INVALID/REJECT on a clean tree, reset the branch to the champion")
    ev.set_defaults(func=cmd_evaluate)
    for module in _command_modules():
        module.add_parser(sub)
    names = tuple(sub.choices)  # the registered subcommands, evaluate included
    if not argv or argv[0] not in names + ("-h", "--help"):
        argv = ["evaluate", *argv]
    return parser.parse_args(argv)


def _command_modules():
    import importlib

    return [importlib.import_module(name) for name in COMMAND_MODULES]


def cmd_evaluate(args):
    from harness import evaluate, report
    from harness.settings import load_settings

    settings = load_settings()
    report.note(f"resolving model {args.model or settings.model} ...")
    ctx = evaluate.make_context(settings, quick=args.quick, model=args.model)
    report.note(f"evaluating inference.py on {ctx.model} ({ctx.preset.name} workload, protocol {ctx.protocol})")
    result = evaluate.evaluate(ctx, apply=args.apply)
    print(report.block(result))
    if args.json:
        print(report.json_line(result))
    return 0


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from harness.ledger import LedgerError
    from harness.models import ModelError
    from harness.settings import SettingsError

    try:
        return args.func(args)
    except (SettingsError, ModelError, LedgerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no row was written for this run; results.tsv is intact", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
