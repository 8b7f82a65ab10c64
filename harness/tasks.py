"""Locked chat tasks and their checks.

The task data lives in ``harness/data/tasks.yaml``; this module loads it and
scores a model's answer with :func:`check`. Checks are written to be hard to
pass by accident: a broken model (empty output, random tokens, one token
repeated, the prompt echoed back) must fail every task, while a working small
instruction-tuned model should pass some of them.

Model-written code is never executed in this process: it runs in a separate
``python -I`` subprocess, in an empty temporary directory, with a timeout, under the
workers' OS sandbox (harness.sandbox: read-only files but that folder, its own PID
namespace, no network), and nothing it starts outlives the check.
"""

from __future__ import annotations

import ast
import json
import math
import re
import secrets
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

import yaml

from harness import sandbox
from harness.models import cache_dir
from harness.settings import ROOT

TASKS_PATH = Path(__file__).resolve().parent / "data" / "tasks.yaml"

KINDS = ("arithmetic", "code", "prose", "poem", "fact")

# Defaults for optional parameters, per kind. The keys double as the set of
# allowed parameters, so a typo in tasks.yaml is an error instead of being ignored.
DEFAULTS: dict[str, dict] = {
    "arithmetic": {"answer": None, "tolerance": 1e-6, "max_words": 200},
    "code": {"function": None, "tests": None, "timeout_s": 5.0},
    "prose": {
        "keywords": None,
        "min_keywords": 2,
        "min_sentences": 2,
        "max_sentences": 10,
        "min_words": 15,
        "max_words": 200,
        "min_distinct_ratio": 0.4,
    },
    "poem": {
        "keywords": None,
        "min_keywords": 1,
        "min_lines": 3,
        "max_lines": 40,
        "min_distinct_ratio": 0.35,
    },
    "fact": {"answers": None, "forbid": [], "max_words": 15},
}
REQUIRED = {kind: {k for k, v in d.items() if v is None} for kind, d in DEFAULTS.items()}

# Code may never run longer than this, whatever tasks.yaml says.
MAX_TIMEOUT_S = 5.0

# Whatever the task, an answer that is one word repeated ("48 48 48") or a long
# answer whose distinct-word ratio is below the floor is a generation loop.
DEGENERATE_MIN_WORDS = 20
DEGENERATE_RATIO = 0.2


@dataclass(frozen=True)
class Task:
    """One chat task: the prompt sent to the model and the check's parameters."""

    id: str
    kind: str
    prompt: str
    params: dict


# --------------------------------------------------------------------------- loading


def load_tasks(path: Path | str | None = None) -> list[Task]:
    """Load and validate tasks; a problem raises ``ValueError`` with a one-line message."""
    path = Path(path) if path is not None else TASKS_PATH
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: invalid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("tasks"), list) or not doc["tasks"]:
        raise ValueError(f"{path}: expected a mapping with a non-empty 'tasks' list")

    tasks: list[Task] = []
    seen: set[str] = set()
    for i, entry in enumerate(doc["tasks"]):
        where = f"{path}: task #{i}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected a mapping")
        extra = set(entry) - {"id", "kind", "prompt", "params"}
        if extra:
            raise ValueError(f"{where}: unknown field(s) {sorted(extra)}")
        task_id = entry.get("id")
        if not isinstance(task_id, str) or not re.fullmatch(r"[a-z0-9_]+", task_id):
            raise ValueError(f"{where}: 'id' must be a lowercase identifier, got {task_id!r}")
        where = f"{path}: task {task_id!r}"
        if task_id in seen:
            raise ValueError(f"{where}: duplicate id")
        seen.add(task_id)
        kind = entry.get("kind")
        if kind not in KINDS:
            raise ValueError(f"{where}: 'kind' must be one of {list(KINDS)}, got {kind!r}")
        prompt = entry.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{where}: 'prompt' must be a non-empty string")
        params = entry.get("params")
        if not isinstance(params, dict):
            raise ValueError(f"{where}: 'params' must be a mapping")
        _validate_params(where, kind, prompt, params)
        tasks.append(Task(task_id, kind, prompt, dict(params)))
    return tasks


def _validate_params(where: str, kind: str, prompt: str, params: dict) -> None:
    unknown = set(params) - set(DEFAULTS[kind])
    if unknown:
        raise ValueError(f"{where}: unknown param(s) {sorted(unknown)} for kind {kind!r}")
    missing = REQUIRED[kind] - set(params)
    if missing:
        raise ValueError(f"{where}: missing param(s) {sorted(missing)}")

    def is_number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    def str_list(name: str) -> None:
        v = params.get(name, DEFAULTS[kind][name])
        if not isinstance(v, list) or not all(isinstance(s, str) and s.strip() for s in v):
            raise ValueError(f"{where}: {name!r} must be a list of non-empty strings")

    for name, value in params.items():
        if name.startswith(("min_", "max_")) or name in ("tolerance", "timeout_s"):
            if not is_number(value) or value < 0:
                raise ValueError(f"{where}: {name!r} must be a non-negative number")

    if kind == "arithmetic":
        if not is_number(params["answer"]):
            raise ValueError(f"{where}: 'answer' must be a number")
        # An echoed prompt must not pass, so its last number may not be the answer.
        last = extract_final_number(prompt)
        if last is not None and math.isclose(last, params["answer"]):
            raise ValueError(f"{where}: the prompt's last number equals the answer")
    elif kind == "code":
        name = params["function"]
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"{where}: 'function' must be a Python identifier")
        str_list("tests")
        if not params["tests"]:
            raise ValueError(f"{where}: 'tests' must not be empty")
        for test in params["tests"]:
            try:
                ast.parse(test)
            except SyntaxError:
                raise ValueError(f"{where}: test does not parse: {test!r}") from None
        if params.get("timeout_s", 0) > MAX_TIMEOUT_S:
            raise ValueError(f"{where}: 'timeout_s' must be <= {MAX_TIMEOUT_S}")
    elif kind in ("prose", "poem"):
        str_list("keywords")
        if params.get("min_keywords", DEFAULTS[kind]["min_keywords"]) > len(params["keywords"]):
            raise ValueError(f"{where}: 'min_keywords' exceeds the number of keywords")
    elif kind == "fact":
        str_list("answers")
        if not params["answers"]:
            raise ValueError(f"{where}: 'answers' must not be empty")
        str_list("forbid")


# --------------------------------------------------------------------------- checking


def check(task: Task, answer: str) -> tuple[bool, str]:
    """Score ``answer`` for ``task``; return ``(passed, short reason)``."""
    if task.kind not in KINDS:
        raise ValueError(f"task {task.id!r}: unknown kind {task.kind!r}")
    if not isinstance(answer, str) or not answer.strip():
        return False, "empty answer"
    if _fold_text(answer) == _fold_text(task.prompt):
        return False, "answer echoes the prompt"
    words = _words(answer)
    if len(words) >= 3 and len(set(words)) == 1:
        return False, f"degenerate: {words[0]!r} repeated"
    if len(words) >= DEGENERATE_MIN_WORDS and _distinct_ratio(words) < DEGENERATE_RATIO:
        return False, f"degenerate: distinct-word ratio {_distinct_ratio(words):.2f}"
    params = {**DEFAULTS[task.kind], **task.params}
    checker = {
        "arithmetic": _check_arithmetic,
        "code": _check_code,
        "prose": _check_prose,
        "poem": _check_poem,
        "fact": _check_fact,
    }[task.kind]
    return checker(params, answer)


def _fold_text(text: str) -> str:
    """Lowercase words and digits joined by single spaces, so case and punctuation don't count."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def _words(text: str) -> list[str]:
    """Lowercased words (letters, digits, inner apostrophes); punctuation dropped."""
    return re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower())


def _distinct_ratio(words: list[str]) -> float:
    return len(set(words)) / len(words) if words else 0.0


def _short_number(x: float) -> str:
    return f"{x:g}"


# ---- arithmetic

# A number made of digits: optional sign, thousands separators, decimals.
# The lookbehind keeps "H2O" or "x3" from yielding a number and treats the "-"
# in "10-3" as an operator, not a sign. A trailing "." ("48.") is not consumed.
_NUM_RE = re.compile(r"(?<![A-Za-z0-9_.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")

_UNITS = "two three four five six seven eight nine ten eleven twelve thirteen fourteen " \
    "fifteen sixteen seventeen eighteen nineteen".split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
_WORD_VALUES = {w: i for i, w in enumerate(_UNITS, start=2)}
_WORD_VALUES.update({w: 10 * i for i, w in enumerate(_TENS, start=2)})
_WORD_VALUES.update({"zero": 0, "one": 1})
# "one" is left out as a standalone word ("the right one", "one way to...");
# it still counts inside compounds such as "twenty-one".
_WORD_NUM_RE = re.compile(
    r"\b(?:(?P<tens>" + "|".join(_TENS) + r")(?:[- ](?P<unit>one|two|three|four|five|six|seven|eight|nine))?"
    r"|(?P<small>zero|" + "|".join(_UNITS) + r"))\b",
    re.IGNORECASE,
)


def extract_final_number(text: str) -> float | None:
    """Return the last number in ``text``, or ``None`` if there is none.

    Digits win: "12, 24 and 48 km/h" gives 48.0, "-5." gives -5.0 and
    "1,000 grams" gives 1000.0. Only when the text has no digits at all are
    number words (zero to ninety-nine, e.g. "twelve", "forty-eight") used,
    because prose such as "these two steps" often follows a numeric answer.
    """
    text = text.replace("\u2212", "-")  # typographic minus sign
    matches = _NUM_RE.findall(text)
    if matches:
        return float(matches[-1].replace(",", ""))
    words = list(_WORD_NUM_RE.finditer(text))
    if not words:
        return None
    m = words[-1]
    if m.group("small"):
        return float(_WORD_VALUES[m.group("small").lower()])
    value = _WORD_VALUES[m.group("tens").lower()]
    if m.group("unit"):
        value += _WORD_VALUES[m.group("unit").lower()]
    return float(value)


def _check_arithmetic(p: dict, answer: str) -> tuple[bool, str]:
    n_words = len(answer.split())
    if n_words > p["max_words"]:
        return False, f"too long: {n_words} words > {p['max_words']}"
    value = extract_final_number(answer)
    expected = float(p["answer"])
    if value is None:
        return False, "no number found"
    if not math.isclose(value, expected, rel_tol=0.0, abs_tol=float(p["tolerance"])):
        return False, f"final number {_short_number(value)} != {_short_number(expected)}"
    return True, f"final number {_short_number(value)} == {_short_number(expected)}"


# ---- code

_FENCE_RE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_CODE_START_RE = re.compile(r"(?:def|class|import|from|async)\b|@")


def _parses(src: str) -> ast.Module | None:
    try:
        return ast.parse(src)
    except (SyntaxError, ValueError):  # ValueError: source with NUL bytes
        return None


def _defines_function(tree: ast.Module) -> bool:
    return any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in tree.body)


def extract_code(text: str) -> str | None:
    """Return the Python code in a model answer, or ``None`` if there is none.

    A fenced block (```python, ```py or a bare ```) is preferred. A block that
    does not parse is cut down to its longest parsing run of lines (below), so
    a generation truncated by the token cap after a complete function, often
    mid-way through an example call and with no closing fence, still counts.
    The first block whose code defines a function wins, else the first with
    any code, else the first block as is (so its syntax error is reported).

    Without a fence, the answer's longest run of consecutive lines that parses
    (after dedenting, for answers indented as a Markdown code block) and starts
    at a code-looking line ("def", "import", ...) is returned; the start rule
    keeps prose that happens to parse ("Sure") out.
    """
    blocks = [
        body for lang, body in _FENCE_RE.findall(text)
        if lang.lower() in ("", "python", "py", "python3")
    ]
    if not blocks:
        return _longest_parsing_run(text)
    candidates = [b.strip("\n") if _parses(b) else _longest_parsing_run(b) for b in blocks]
    for code in candidates:
        if code is not None and _defines_function(ast.parse(code)):
            return code
    for code in candidates:
        if code:
            return code
    return blocks[0].strip("\n")


def _longest_parsing_run(text: str) -> str | None:
    """The longest run of lines that parses and starts at a code-looking line, dedented."""
    lines = text.splitlines()
    best: tuple[int, int] | None = None  # (start, end) of the longest parsing run
    for start, line in enumerate(lines):
        if not _CODE_START_RE.match(line.lstrip()):
            continue
        if best is not None and len(lines) - start <= best[1] - best[0]:
            break  # no later run can be longer than the best one
        for end in range(len(lines), start, -1):
            if best is not None and end - start <= best[1] - best[0]:
                break
            if _parses(textwrap.dedent("\n".join(lines[start:end]))) is not None:
                best = (start, end)
                break
    if best is None:
        return None
    return textwrap.dedent("\n".join(lines[best[0]:best[1]])).strip("\n")


# Runs inside the child process. It reads {"code", "tests", "nonce"} as JSON on
# stdin, runs the code and then the tests in one namespace, and prints
# "PASS <nonce>" only if both finish. The nonce means an answer that exits
# early with status 0 (sys.exit(0), os._exit(0)) cannot pass. The answer's own
# prints go to a null sink so a print loop cannot flood the pipe; __name__ is
# not "__main__" so demo blocks that call input() stay inert.
_RUNNER = r"""
import json, sys, traceback
job = json.load(sys.stdin)
class _Null:
    def write(self, s): return len(s)
    def flush(self): pass
out, null = sys.stdout, _Null()
sys.stdin = None
sys.stdout = sys.stderr = null
try:
    ns = {"__name__": "answer"}
    exec(compile(job["code"], "<answer>", "exec"), ns)
    exec(compile(job["tests"], "<tests>", "exec"), ns)
except BaseException as exc:
    where = ""
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename in ("<answer>", "<tests>"):
            where = f" at {frame.filename} line {frame.lineno}"
    msg = " ".join(str(exc).split())[:80]
    out.write(f"FAIL {job['nonce']} {type(exc).__name__}{where}" + (f": {msg}" if msg else "") + "\n")
else:
    out.write(f"PASS {job['nonce']}\n")
out.flush()
"""


def _run_tests(code: str, tests: list[str], timeout_s: float) -> tuple[bool, str]:
    """Run ``code`` then ``tests`` in a fresh sandboxed ``python -I`` process; pass iff it reports success."""
    nonce = secrets.token_hex(8)
    job = json.dumps({"code": code, "tests": "\n".join(tests), "nonce": nonce})
    # An empty scratch directory, the sandbox's one writable folder, as cwd: relative-path
    # file operations in the answer land there, not in the repository.
    with tempfile.TemporaryDirectory(prefix="task-code-") as scratch:
        # no reference, no repository (results.tsv, runs/, .git) and no temp folder (the
        # workers' folders are there); the scratch folder inside it is bound back writable
        box = sandbox.wrap([sys.executable, "-I", "-c", _RUNNER], scratch,
                           hide=[cache_dir() / "reference", ROOT, tempfile.gettempdir()], expose=[sys.prefix])
        returncode, stdout = _run_confined(box, job, scratch, timeout_s)
    if returncode is None:
        return False, f"timed out after {_short_number(timeout_s)}s"
    last = stdout.strip().splitlines()[-1:] or [""]
    if returncode == 0 and last[0] == f"PASS {nonce}":
        return True, f"passed {len(tests)} tests"
    if last[0].startswith(f"FAIL {nonce} "):
        reason = last[0][len(f"FAIL {nonce} "):]
        m = re.match(r"AssertionError at <tests> line (\d+)", reason)
        if m and 1 <= int(m.group(1)) <= len(tests):
            return False, f"test failed: {tests[int(m.group(1)) - 1]}"
        return False, reason
    return False, f"exited with status {returncode} before the tests finished"


def _run_confined(box: sandbox.Sandbox, job: str, folder: str, timeout_s: float) -> tuple[int | None, str]:
    """Run the sandboxed runner on ``job``; (exit status or None on timeout, its stdout).

    Every process it started is killed before this returns: bwrap's PID namespace dies
    with its first process; unsandboxed, its process group and descendants are killed
    (a daemon that left them is a stray of the harness, killed with the next worker).
    """
    try:
        proc = subprocess.Popen(box.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, cwd=folder, env=box.env,
                                start_new_session=True, pass_fds=box.pass_fds)
    finally:
        box.close()
    with proc:
        stdout = None
        try:
            stdout, _ = proc.communicate(job, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
        finally:
            # Until it is reaped its pid is its own; its group id stays its own while the group lives.
            root = proc.pid if proc.returncode is None else None
            sandbox.kill_all(lambda table: sandbox.members(table, root=root, pgid=proc.pid), waited=[proc.pid])
            proc.kill()  # a no-op once it has exited; leaving the block waits for it
    return (None if stdout is None else proc.returncode), stdout or ""


def _check_code(p: dict, answer: str) -> tuple[bool, str]:
    code = extract_code(answer)
    if code is None:
        return False, "no code found"
    tree = _parses(code)
    if tree is None:
        return False, "code has a syntax error"
    name = p["function"]
    if not any(isinstance(n, ast.FunctionDef) and n.name == name for n in tree.body):
        return False, f"no top-level function named {name!r}"
    return _run_tests(code, p["tests"], min(float(p["timeout_s"]), MAX_TIMEOUT_S))


# ---- prose, poem, fact


def _keyword_re(keyword: str) -> re.Pattern:
    """Whole-word, case-insensitive; optional plural; trailing '*' means prefix."""
    kw = keyword.strip()
    if kw.endswith("*"):
        body, tail = kw[:-1], r"\w*"
    else:
        body, tail = kw, r"(?:s|es)?\b"
    body = r"\s+".join(re.escape(part) for part in body.split())
    return re.compile(r"\b" + body + tail, re.IGNORECASE)


def _keywords_found(keywords: list[str], text: str) -> list[str]:
    return [kw for kw in keywords if _keyword_re(kw).search(text)]


def _check_keywords(p: dict, text: str) -> tuple[bool, str] | None:
    found = _keywords_found(p["keywords"], text)
    if len(found) < p["min_keywords"]:
        return False, f"{len(found)} topic keywords < {p['min_keywords']}"
    return None


def _sentences(text: str) -> list[str]:
    """Split on . ! ? followed by whitespace; fragments under three words don't count."""
    parts = re.split(r"(?<=[.!?])\s+", text.strip())
    return [s for s in parts if len(_words(s)) >= 3]


def _check_prose(p: dict, answer: str) -> tuple[bool, str]:
    words = _words(answer)
    if not p["min_words"] <= len(words) <= p["max_words"]:
        return False, f"{len(words)} words, want {p['min_words']}-{p['max_words']}"
    sentences = _sentences(answer)
    if not p["min_sentences"] <= len(sentences) <= p["max_sentences"]:
        return False, f"{len(sentences)} sentences, want {p['min_sentences']}-{p['max_sentences']}"
    folded = [_fold_text(s) for s in sentences]
    if len(set(folded)) < len(folded):
        return False, "a sentence is repeated"
    ratio = _distinct_ratio(words)
    if ratio < p["min_distinct_ratio"]:
        return False, f"distinct-word ratio {ratio:.2f} < {p['min_distinct_ratio']}"
    failed = _check_keywords(p, answer)
    if failed:
        return failed
    return True, f"{len(sentences)} sentences, {len(_keywords_found(p['keywords'], answer))} keywords"


def _check_poem(p: dict, answer: str) -> tuple[bool, str]:
    lines = [ln.strip() for ln in answer.splitlines() if _words(ln)]
    if not p["min_lines"] <= len(lines) <= p["max_lines"]:
        return False, f"{len(lines)} lines, want {p['min_lines']}-{p['max_lines']}"
    # Refrains are fine, but at least half of the lines must be distinct.
    distinct_lines = len({_fold_text(ln) for ln in lines})
    if distinct_lines < 2 or distinct_lines * 2 < len(lines):
        return False, f"only {distinct_lines} distinct lines of {len(lines)}"
    ratio = _distinct_ratio(_words(answer))
    if ratio < p["min_distinct_ratio"]:
        return False, f"distinct-word ratio {ratio:.2f} < {p['min_distinct_ratio']}"
    failed = _check_keywords(p, answer)
    if failed:
        return failed
    return True, f"{len(lines)} lines, {len(_keywords_found(p['keywords'], answer))} keywords"


# Small models sometimes write chemical formulas with Unicode subscripts (H₂O).
_SUBSCRIPTS = str.maketrans("₀₁₂₃₄₅₆₇₈₉", "0123456789")


def _check_fact(p: dict, answer: str) -> tuple[bool, str]:
    text = answer.translate(_SUBSCRIPTS)
    n_words = len(text.split())
    if n_words > p["max_words"]:
        return False, f"too long: {n_words} words > {p['max_words']}"
    wrong = [w for w in p["forbid"] if re.search(rf"\b{re.escape(w)}\b", text, re.IGNORECASE)]
    if wrong:
        return False, f"mentions a wrong answer: {wrong[0]}"
    for expected in p["answers"]:
        if re.search(rf"\b{re.escape(expected)}\b", text, re.IGNORECASE):
            return True, f"mentions {expected!r}"
    return False, f"does not mention {' or '.join(map(repr, p['answers']))}"
