"""The locked evaluation harness. Do not edit: a run with a changed prepare.py is rejected.

    python prepare.py [--quick] [--json] [--model M]   evaluate inference.py (the default command)

Exit status: 0 when the harness gave a decision (whatever it is), 2 for a usage or
settings error, 1 for a failure of the harness itself.

`evaluate` and `search` run pipeline code, so they never run the harness from the
working tree: prepare.py copies the locked files as committed (this branch's baseline
commit, or HEAD before there is one) into a new temporary folder and runs that copy in
Python's isolated mode, with no bytecode read from or written into the repository.
"""

import os
import sys

# Nothing in the repository may shadow a library: drop the script's folder from the
# front of the path (before any import that is not built in) and look for the harness
# package last. The pristine copy runs with -I, which leaves the folder out anyway.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE] + [HERE]

import argparse  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# Subcommands that live in their own harness module: each has add_parser(sub) and run(args).
COMMAND_MODULES = ["harness.log", "harness.profile", "harness.search", "harness.analyze", "harness.morning"]
# The commands that run pipeline code, write verdicts or read them out: always from a pristine
# copy (the morning read too: harness/log.py committed on a branch would otherwise run in place).
PRISTINE_COMMANDS = ("evaluate", "search", "log", "analyze", "report")
REPO_ENV = "MLX_HILLCLIMB_REPO"  # set in the pristine copy: the repository it measures
CODE_ENV = "MLX_HILLCLIMB_HARNESS_COMMIT"  # ... and the commit its harness code is as of
HARNESS_CODE = ("prepare.py", "harness")  # what runs as of it (harness/settings.py has both too)
# The settings come from the branch. Nothing else of the tree goes into the copy: it is on the
# harness's path, where a package no library has installed but one probes for (gitdb's
# `gitdb_speedups`) would run as harness code (red team 6: KEEP from a new branch's first commit).
HARNESS_SETTINGS = ("harness.yaml",)


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
    # inference.py may hold an int literal of any size: the harness reads it (the change
    # monitor, the code hash, the run file) and must not fail on one over Python's 4300-digit
    # limit for writing ints in decimal (no row would be written). Workers keep the limit.
    sys.set_int_max_str_digits(0)
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv and not argv[0].startswith("-") else "evaluate"
    if command in PRISTINE_COMMANDS and REPO_ENV not in os.environ:
        return run_pristine(argv)
    guard_interrupts()
    args = parse_args(argv)
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


SI_KERNEL = 0x80  # si_code of a signal the kernel sent, e.g. the terminal's Ctrl-C


def guard_interrupts():
    """Only a Ctrl-C from the user's terminal interrupts the harness.

    A SIGINT that another process sent (kill) is reported and ignored: pipeline code must
    not be able to stop a run after tampering with its files. SIGINT is blocked in every
    thread and read with sigwaitinfo by a watcher, which tells a real one to the main
    thread through SIGUSR2 and a flag no other process can set. Linux only (macOS has no
    sigwaitinfo; its sandbox denies signals to other processes).
    """
    import signal
    import threading

    if not hasattr(signal, "sigwaitinfo") or threading.current_thread() is not threading.main_thread():
        return
    requested = threading.Event()

    def on_usr2(signum, frame):
        if requested.is_set():
            raise KeyboardInterrupt

    def watch():
        while True:
            info = signal.sigwaitinfo({signal.SIGINT})
            if info.si_code == SI_KERNEL:
                requested.set()
                signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR2)
            else:
                print(f"warning: ignored a SIGINT sent by process {info.si_pid}: only Ctrl-C in the "
                      f"terminal interrupts a run", file=sys.stderr, flush=True)

    signal.signal(signal.SIGUSR2, on_usr2)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    threading.Thread(target=watch, name="interrupts", daemon=True).start()


# ---------------------------------------------------------------------------
# The pristine copy (standard library only: it runs before any harness code)
# ---------------------------------------------------------------------------
def run_pristine(argv):
    """Run `prepare.py ARGV` from a fresh copy of the committed locked files; its exit status."""
    import signal
    import subprocess
    import tempfile

    commit = _source_commit(HERE)
    code = _code_commit(HERE, commit) if commit else None
    if commit and code is None:
        print(f"error: HEAD descends from no commit with a BASELINE in results.tsv (the harness code "
              f"runs as of the first one in HEAD's history): start branches from a measured commit, "
              f"or move results.tsv and results.tsv.sha256 away to begin a new ledger", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="mlx-hillclimb-harness-") as home:
        if commit:
            _extract(HERE, commit, home, only=HARNESS_SETTINGS)
            _extract(HERE, code, home, only=HARNESS_CODE)
        else:  # not a git repository, or no commit yet: nothing is committed to copy
            print("warning: no git commit to copy the harness from: it runs from the working tree",
                  file=sys.stderr)
            home = HERE
        command = [sys.executable, "-I", "-B", os.path.join(home, "prepare.py"), *argv]
        child = subprocess.Popen(command, env={**os.environ, REPO_ENV: HERE, CODE_ENV: code or ""})
        # Ctrl-C reaches the copy directly (same process group); this process only waits.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            return child.wait()
        finally:
            signal.signal(signal.SIGINT, previous)


def _git(repo, *args):
    import subprocess

    # the real history: no replace refs, no grafts file (either could rewrite a commit's parents)
    env = {**os.environ, "GIT_NO_REPLACE_OBJECTS": "1", "GIT_GRAFT_FILE": os.devnull}
    proc = subprocess.run(["git", "-C", repo, *args], capture_output=True, env=env)
    return proc.stdout if proc.returncode == 0 else None


def _source_commit(repo):
    """This branch's BASELINE commit from results.tsv (an ancestor of HEAD), else HEAD;
    None outside a git repository or before the first commit. The ledger's short hashes are
    looked up among the commits, never the refs (a branch named like one would shadow it)."""
    head = _git(repo, "rev-parse", "--verify", "-q", "HEAD")
    if head is None:
        return None
    branch = (_git(repo, "symbolic-ref", "-q", "--short", "HEAD") or b"").decode().strip()
    for short in reversed(_baseline_commits(os.path.join(repo, "results.tsv"), branch)):
        full = _resolve(repo, short)
        if full and _git(repo, "merge-base", "--is-ancestor", full, "HEAD") is not None:
            return full
    return head.decode().strip()


def _code_commit(repo, fallback):
    """The commit the harness code (HARNESS_CODE) runs as of: the first BASELINE in HEAD's
    history, of any branch. A new branch's first commit is its own (its BASELINE locks it),
    so code taken from there would be code the agent wrote (a red team rewrote
    harness/verdict.py there: KEEP +16.8 % for a no-op). `fallback` (HEAD's commit) before
    the first BASELINE; None when results.tsv has BASELINEs but none in HEAD's history."""
    shorts = _baseline_commits(os.path.join(repo, "results.tsv"), None)
    for short in shorts:
        full = _resolve(repo, short)
        if full and _git(repo, "merge-base", "--is-ancestor", full, "HEAD") is not None:
            return full
    return None if shorts else fallback


def _resolve(repo, short):
    """The one commit whose hash starts with `short`, or None (looked up among the objects,
    never the refs: a branch named like a short hash would shadow it)."""
    found = (_git(repo, "rev-parse", f"--disambiguate={short}") or b"").decode().split()
    commits = [h for h in found if (_git(repo, "cat-file", "-t", h) or b"").strip() == b"commit"]
    return commits[0] if len(commits) == 1 else None


def _baseline_commits(path, branch):
    """Commits of the BASELINE rows of `branch` (every branch's when None) in results.tsv,
    oldest first (the ledger's own reader lives in harness/ledger.py; this runs before any
    harness code may)."""
    import csv
    import hashlib

    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().split("\n")
    except OSError:
        return []
    try:  # rows the harness did not write (not in its index) never count
        with open(path + ".sha256") as f:
            trusted = set(f.read().split())
        lines = lines[:1] + [t for t in lines[1:] if hashlib.sha256(t.encode()).hexdigest() in trusted]
    except FileNotFoundError:
        pass
    # line by line: a stray quote in one row never swallows the next
    rows = [next(csv.reader([line], delimiter="\t"), []) for line in lines]
    if not rows or not {"commit", "branch", "decision"} <= set(rows[0]):
        return []
    at = {name: rows[0].index(name) for name in ("commit", "branch", "decision")}
    return [r[at["commit"]] for r in rows[1:] if len(r) == len(rows[0])
            and r[at["decision"]] == "BASELINE" and branch in (None, r[at["branch"]])]


def _extract(repo, commit, home, only):
    """Write the files `only` (paths) of `commit` into `home` (git archive), in place of
    what `home` had there."""
    import io
    import shutil
    import tarfile

    blob = _git(repo, "archive", "--format=tar", commit, *only)
    for path in only:
        target = os.path.join(home, path)
        if os.path.isdir(target):
            shutil.rmtree(target)
        elif os.path.exists(target):
            os.remove(target)
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(home, filter="data")


if __name__ == "__main__":
    sys.exit(main())
