"""The change monitor: what an experiment changed in inference.py, and what it may cost.

The original harness matched constants with regular expressions and missed argmax as soon
as the constant moved to another line. This one reads both versions with `ast`:

    compare(old_source, new_source) -> {"knobs", "functions", "module", "lines", "warnings",
                                        "summary", "error"}
    format_report(vs_baseline, vs_champion) -> the "CHANGES FROM BASELINE" box for people

Knobs are module-level UPPER_CASE assignments, read and compared by harness.knobs: values
are compared as values, so moving or reformatting a constant is not a change, and 1 vs 1.0
is not a change either (True vs 1 is).
Functions and classes are compared by their syntax tree without line numbers, so
comment and blank-line edits are not changes. Tradeoff warnings come from RULES, a table
evaluated on the new source against the old: a rule warns about what is present in the
new source and differs from the old one.
"""

import ast
from collections import Counter
from dataclasses import dataclass, field

from harness.code_size import code_lines, uncounted_lines
from harness.knobs import Expr, assignments, has_big_int, is_knob_statement, is_number, parse, same, show, values

ARGMAX_TEMP = 1e-6          # a temperature at or below this samples like argmax
LOW_PRECISION = ("float16", "bfloat16")
SUMMARY_MAX_CHARS = 300     # the summary lives in one results.tsv cell


# ---------------------------------------------------------------------------
# Reading one source
# ---------------------------------------------------------------------------
@dataclass
class Facts:
    """What the rules need to know about one version of inference.py."""
    knobs: dict = field(default_factory=dict)           # name -> value (or knobs.Expr text)
    defs: dict = field(default_factory=dict)            # top-level def/class name -> ast.dump
    statements: Counter = field(default_factory=Counter)  # other top-level statements, unparsed
    names: Counter = field(default_factory=Counter)     # identifiers and attributes used anywhere
    generate_names: Counter = field(default_factory=Counter)  # ... inside generate()
    state: set = field(default_factory=set)             # what keeps state across calls
    work_overrides: set = field(default_factory=set)    # what overrides max_tokens
    patches: set = field(default_factory=set)           # library attributes assigned at run time
    lines: int = 0
    error: str = ""                                     # the SyntaxError, if it does not parse

    def knob(self, name):
        return self.knobs.get(name)

    def uses(self, *names):
        return sum(self.names[n] for n in names)

    def eos_refs(self):
        # tokenizer.eos_token_ids, an `eos` set, eos_token_id ...: anything named after EOS
        return sum(c for n, c in self.names.items() if "eos" in n.lower() and n != "stop_at_eos")


def _docstring_node(tree):
    """The module docstring's statement (a docstring edit is not a code change), or None."""
    first = tree.body[0] if tree.body else None
    if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str)):
        return first
    return None


def _identifiers(node):
    """Counter of every Name id and Attribute attr under `node` (mx.argmax counts 'mx' and 'argmax')."""
    found = Counter()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name):
            found[sub.id] += 1
        elif isinstance(sub, ast.Attribute):
            found[sub.attr] += 1
    return found


_CONTAINER_CALLS = {"dict", "list", "set", "OrderedDict", "defaultdict", "deque", "LRUCache"}
_CACHE_DECORATORS = {"lru_cache", "cache", "cached"}


def _state_across_calls(tree):
    """Descriptions of what can carry prompts or KV state from one call to the next."""
    found = set()
    for node in tree.body:
        # a module-level container: somewhere to keep prompts, answers or caches
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            value = node.value
            call = value.func if isinstance(value, ast.Call) else None
            call_name = getattr(call, "id", None) or getattr(call, "attr", None)
            if isinstance(value, (ast.Dict, ast.List, ast.Set)) or call_name in _CONTAINER_CALLS:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    if isinstance(t, ast.Name):
                        found.add(f"module-level {t.id}")
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for deco in node.decorator_list:
                target = deco.func if isinstance(deco, ast.Call) else deco
                name = getattr(target, "id", None) or getattr(target, "attr", None)
                if name in _CACHE_DECORATORS:
                    found.add(f"@{name} on {node.name}")
            for sub in ast.walk(node):
                if isinstance(sub, ast.Global):
                    found.update(f"global {n} in {node.name}" for n in sub.names)
            # generate/score storing something on the pipeline outlives the call
            if node.name in ("generate", "score"):
                for sub in ast.walk(node):
                    if isinstance(sub, ast.Attribute) and isinstance(sub.ctx, ast.Store):
                        found.add(f"{node.name} stores .{sub.attr}")
    return found


def _work_overrides(tree):
    """Descriptions of code that sets max_tokens to anything but the caller's value."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "max_tokens":
            if not (isinstance(node.value, ast.Name) and node.value.id == "max_tokens"):
                found.add(f"max_tokens={ast.unparse(node.value)}")
        elif isinstance(node, ast.Name) and node.id == "max_tokens" and isinstance(node.ctx, ast.Store):
            found.add("max_tokens reassigned")
        elif isinstance(node, ast.AugAssign) and getattr(node.target, "id", None) == "max_tokens":
            found.add("max_tokens reassigned")
    for name, _ in assignments(tree):
        if "TOKENS" in name and name != "NUM_DRAFT_TOKENS":
            found.add(f"knob {name}")
    return found


LIBRARY_PREFIXES = ("mlx", "mlx_lm")  # module names whose code a pipeline must not patch


def _library_module(name):
    return any(name == p or name.startswith(p + ".") for p in LIBRARY_PREFIXES)


def _library_names(tree):
    """Names bound by imports from mlx / mlx_lm anywhere in `tree`: `mx` for
    `import mlx.core as mx`, `mlx_lm` for `import mlx_lm.generate`, `KVCache` for
    `from mlx_lm.models.cache import KVCache`."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _library_module(alias.name):
                    names.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and _library_module(node.module or ""):
            names.update(alias.asname or alias.name for alias in node.names)
    return names


def _patched_object(node, library):
    """The text of `node` when it is library code (rooted at a name in `library`, a class
    reached through `type(x)` / `x.__class__`, or a module looked up by an 'mlx...' string
    such as `sys.modules["mlx_lm.generate"]`), else None."""
    root = node
    while isinstance(root, (ast.Attribute, ast.Subscript, ast.Call)):
        if isinstance(root, ast.Attribute) and root.attr == "__class__":
            return ast.unparse(node)
        if isinstance(root, ast.Call):
            if getattr(root.func, "id", None) == "type":
                return ast.unparse(node)
            root = root.func
        else:
            root = root.value
    strings = [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    if (isinstance(root, ast.Name) and root.id in library) or any(_library_module(t) for t in strings):
        return ast.unparse(node)
    return None


def _library_patches(tree):
    """Descriptions of run-time patches of library code: an assignment to an attribute of
    an mlx / mlx_lm module or class (`mlx_lm.generate.generate_step = f`, `mx.fast.x = f`,
    `KVCache.update_and_fetch = f`) or `setattr(...)` on one. Changes to the library
    hide behind a small diff of inference.py, so a person should read them."""
    library, found = _library_names(tree), set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for sub in ast.walk(target):  # tuple targets: a, mx.x = ...
                    if isinstance(sub, ast.Attribute) and isinstance(sub.ctx, ast.Store):
                        what = _patched_object(sub.value, library)
                        if what:
                            found.add(f"{what}.{sub.attr} =")
        elif (isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("setattr", "delattr")
              and node.args):
            what = _patched_object(node.args[0], library)
            if what:
                found.add(f"{node.func.id}({what}, ...)")
    return found


def facts(source):
    """Parse `source` into Facts; a source that does not parse gets Facts with `error` set."""
    out = Facts(lines=code_lines(source))
    try:
        tree = parse(source)  # huge ints as BigInt: ast.dump / ast.unparse write them in hex
    except SyntaxError as exc:
        out.error = f"line {exc.lineno}: {exc.msg}"
        return out
    out.knobs = values(source, tree)
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.defs[node.name] = ast.dump(node)  # no line numbers: moving code is no change
            if node.name == "generate":
                out.generate_names = _identifiers(node)
        elif not is_knob_statement(node) and node is not _docstring_node(tree):
            out.statements[ast.unparse(node)] += 1  # imports, helpers' state, module code
    out.names = _identifiers(tree)
    out.state = _state_across_calls(tree)
    out.work_overrides = _work_overrides(tree)
    out.patches = _library_patches(tree)
    return out


# ---------------------------------------------------------------------------
# The rules
# ---------------------------------------------------------------------------
def _argmax_like(f):
    temp = f.knob("TEMP")
    return (is_number(temp) and temp <= ARGMAX_TEMP) or f.uses("argmax") > 0


# Calls and classes that quantize weights: nn.quantize / mx.quantize (both read as
# `quantize`), mlx_lm.utils.quantize_model, nn.QuantizedLinear / QuantizedEmbedding.
REQUANTIZE_NAMES = ("quantize", "quantize_model", "QuantizedLinear", "QuantizedEmbedding")
SAMPLING_KNOBS = ("TEMP", "TOP_P", "TOP_K", "MIN_P", "REPETITION_PENALTY", "REPETITION_CONTEXT")


def _knob_set_and_changed(name, present):
    """A rule test: knob `name` satisfies `present` in the new source and differs from the old."""
    def test(old, new):
        value = new.knob(name)
        return present(value) and not same(value, old.knob(name))
    return test


def _more(*names):
    """A rule test: the new source uses any of `names` more often than the old one."""
    return lambda old, new: new.uses(*names) > old.uses(*names)


def _either(*tests):
    return lambda old, new: any(t(old, new) for t in tests)


def _lower_cache_limit(old, new):
    value, before = new.knob("CACHE_LIMIT_GB"), old.knob("CACHE_LIMIT_GB")
    if not is_number(value):
        return False
    return not is_number(before) or value < before


@dataclass(frozen=True)
class Rule:
    id: str
    test: object        # (old Facts, new Facts) -> bool
    message: str


# The tradeoff warnings: each test looks at the new source against the old and is true
# when the new one has the feature and the old one did not have it (or had it otherwise).
RULES = [
    Rule("argmax",
         _either(_knob_set_and_changed("TEMP", lambda v: is_number(v) and v <= ARGMAX_TEMP),
                 _more("argmax")),
         "argmax decoding: deterministic output, no sampling diversity"),
    Rule("sampling",
         lambda old, new: not _argmax_like(new) and any(
             not same(old.knob(k), new.knob(k)) for k in SAMPLING_KNOBS),
         "sampling settings changed: the answer distribution changes, watch the task gates"),
    Rule("quantized_kv",
         _either(_knob_set_and_changed("KV_BITS", lambda v: v is not None),
                 _more("to_quantized", "QuantizedKVCache")),
         "quantized KV cache: quality risk, and often slower at short contexts "
         "(the seed measured -5.5 % on a 3B model)"),
    Rule("rotating_kv",
         _either(_knob_set_and_changed("MAX_KV_SIZE", lambda v: v is not None),
                 _more("RotatingKVCache")),
         "rotating KV window: the model loses the context beyond the window"),
    Rule("speculative",
         _either(lambda old, new: (not same(old.knob("NUM_DRAFT_TOKENS"), new.knob("NUM_DRAFT_TOKENS"))
                                   and new.uses("draft_model") > 0),
                 _more("speculative_generate_step")),
         "speculative decoding: needs a matching draft model (harness.yaml draft_model); "
         "the speed depends on the acceptance rate"),
    Rule("precision",
         _either(_knob_set_and_changed("COMPUTE_DTYPE", lambda v: v in LOW_PRECISION),
                 _more(*LOW_PRECISION)),
         "lower compute precision: precision loss (and 3-10x slower on Linux CPU)"),
    Rule("cache_limit",
         _either(_lower_cache_limit, _more("set_cache_limit", "set_memory_limit", "set_wired_limit")),
         "lower memory/cache limit: may slow allocation-heavy phases such as prefill"),
    Rule("eos",
         lambda old, new: ((old.generate_names["stop_at_eos"] and not new.generate_names["stop_at_eos"])
                           or (old.eos_refs() and not new.eos_refs())),
         "EOS handling removed: answers no longer stop at the end of the turn"),
    Rule("compile",
         _more("compile"),
         "mx.compile added: first-call compile cost, recompiles when shapes change"),
    Rule("state",
         lambda old, new: bool(new.state - old.state),
         "state kept across calls (prompt/KV caching): must not replay answers, "
         "every prompt carries a fresh nonce"),
    Rule("work",
         lambda old, new: bool(new.work_overrides - old.work_overrides),
         "max_tokens overridden: the harness enforces exactly max_tokens tokens per speed call "
         "(fewer or more is INVALID)"),
    Rule("requantize",
         _more(*REQUANTIZE_NAMES),
         "weights re-quantized in the pipeline: fewer bits than the model as published; the "
         "gates measure the loss, but answers on other prompts may degrade more"),
    Rule("patching",
         lambda old, new: bool(new.patches - old.patches),
         "mlx / mlx-lm patched at run time: library code now behaves differently for the "
         "whole worker, beyond what inference.py's diff shows; read the patch"),
]


def warnings(old, new):
    """[{"id", "message"}] for every rule whose test holds for (old Facts, new Facts)."""
    return [{"id": r.id, "message": r.message} for r in RULES if r.test(old, new)]


# ---------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------
def _knob_changes(old, new):
    changes = []
    for name in list(old.knobs) + [n for n in new.knobs if n not in old.knobs]:
        if name not in new.knobs:
            change = "removed"
        elif name not in old.knobs:
            change = "added"
        elif same(old.knobs[name], new.knobs[name]):
            continue
        else:
            change = "changed"
        entry = {"name": name, "change": change, "old": None, "new": None,
                 "old_text": "", "new_text": ""}
        for side, f in (("old", old), ("new", new)):
            if name in f.knobs:
                value = f.knobs[name]
                # as text what JSON could only write in decimal (the run file): see knobs.BIG_INT_BITS
                entry[side] = str(value) if isinstance(value, Expr) else show(value) if has_big_int(value) else value
                entry[f"{side}_text"] = show(value)
        changes.append(entry)
    return changes


def _statement_changes(old, new):
    """Top-level statements (not knobs, not defs) added and removed, one short line each."""
    def short(text):
        first = " ".join(text.splitlines()[0].split()) if text.strip() else text
        return first if len(first) <= 60 else first[:57] + "..."
    return {"added": [short(t) for t in (new.statements - old.statements).elements()],
            "removed": [short(t) for t in (old.statements - new.statements).elements()]}


def _knob_short(k):
    if k["change"] == "added":
        return f"+{k['name']}={k['new_text']}"
    if k["change"] == "removed":
        return f"-{k['name']}"
    return f"{k['name']} {k['old_text']}->{k['new_text']}"


def summary_line(result):
    """One line for the results.tsv `changes` column, e.g. `TEMP 0.7->0; +0 lines; warnings: argmax`."""
    parts = []
    if result.get("failed"):
        parts.append(result["failed"])
    elif result.get("error"):
        parts.append(f"does not parse ({result['error']})")
    if result["knobs"]:
        parts.append(", ".join(_knob_short(k) for k in result["knobs"]))
    for kind in ("changed", "added", "removed"):
        if result["functions"][kind]:
            parts.append(f"{kind} {', '.join(result['functions'][kind])}")
    for kind, sign in (("added", "+"), ("removed", "-")):
        parts.extend(f"{sign}{text}" for text in result["module"][kind])
    if not parts:
        parts.append("no code changes")
    # The line delta and the warnings end the cell and are never cut: the morning summary
    # reads them back (harness/summary.py); the description before them is cut to fit.
    delta = result["lines"]["delta"]
    tail = [f"{delta:+d} lines" if delta is not None else "? lines"]
    if result["warnings"]:
        tail.append("warnings: " + ", ".join(w["id"] for w in result["warnings"]))
    head, tail = " ".join("; ".join(parts).split()), "; ".join(tail)
    room = SUMMARY_MAX_CHARS - len(tail) - 2
    if len(head) > room:
        head = head[:max(room - 3, 0)] + "..."
    return f"{head}; {tail}"


def compare(old_source, new_source):
    """What changed from `old_source` to `new_source` (two versions of inference.py).

    Never raises: should the monitor fail on some source, the result says so in `failed`
    (one line, "change monitor failed: ..."), which is also why the line count is not
    trusted (lines.uncounted: no "simpler" credit); the run goes on and its row is written.

    Returns plain data:
        knobs:     [{"name", "change" (changed|added|removed), "old", "new", "old_text", "new_text"}]
        functions: {"added": [...], "removed": [...], "changed": [...]} top-level defs and classes
        module:    {"added": [...], "removed": [...]} other top-level statements (imports ...)
        lines:     {"old", "new", "delta", "uncounted"}: code_lines() of each source and the
                   difference; uncounted is "" or why the new count cannot be trusted
                   (uncounted_lines: code hidden in data), then "simpler" must not count it
        warnings:  [{"id", "message"}] from RULES
        summary:   one line for results.tsv
        error:     "" or where a source does not parse (then only lines are compared)
        failed:    "" or "change monitor failed: <why>" (then nothing else was compared)
    """
    try:
        return _compare(old_source, new_source)
    except Exception as exc:  # noqa: BLE001 - a report, never the end of the run
        return _failed(old_source, new_source, exc)


def _failed(old_source, new_source, exc):
    """compare()'s result when it raised `exc`: the failure in one line, the line counts if
    they can still be had, and the count not trusted."""
    why = " ".join(f"change monitor failed: {type(exc).__name__}: {exc}".split())[:200]
    lines = {"old": None, "new": None, "delta": None, "uncounted": why}
    try:
        old, new = code_lines(old_source), code_lines(new_source)
        lines.update(old=old, new=new, delta=new - old)
    except Exception:  # noqa: BLE001
        pass
    result = {"knobs": [], "functions": {"added": [], "removed": [], "changed": []},
              "module": {"added": [], "removed": []}, "lines": lines,
              "warnings": [{"id": "monitor", "message": why + " (no 'simpler' credit)"}],
              "error": "", "failed": why}
    result["summary"] = summary_line(result)
    return result


def _compare(old_source, new_source):
    old, new = facts(old_source), facts(new_source)
    result = {
        "knobs": [], "functions": {"added": [], "removed": [], "changed": []},
        "module": {"added": [], "removed": []},
        "lines": {"old": old.lines, "new": new.lines, "delta": new.lines - old.lines,
                  "uncounted": uncounted_lines(old_source, new_source)},
        "warnings": [], "error": "", "failed": "",
    }
    if old.error or new.error:
        which = "new" if new.error else "old"
        result["error"] = f"{which} source, {new.error or old.error}"
        result["warnings"] = [{"id": "syntax", "message": f"the {which} inference.py does not parse: "
                                                          f"{new.error or old.error}"}]
    else:
        result["knobs"] = _knob_changes(old, new)
        result["functions"] = {
            "added": [n for n in new.defs if n not in old.defs],
            "removed": [n for n in old.defs if n not in new.defs],
            "changed": [n for n in new.defs if n in old.defs and new.defs[n] != old.defs[n]],
        }
        result["module"] = _statement_changes(old, new)
        result["warnings"] = warnings(old, new)
        if result["lines"]["uncounted"]:
            result["warnings"].append({"id": "uncounted", "message": "the line count cannot be trusted: "
                                       + result["lines"]["uncounted"] + " (no 'simpler' credit)"})
    result["summary"] = summary_line(result)
    return result


# ---------------------------------------------------------------------------
# The report for people
# ---------------------------------------------------------------------------
RULE_WIDTH = 60


def _section(title, result):
    lines = ["=" * RULE_WIDTH, title, "=" * RULE_WIDTH]
    if result.get("failed"):
        lines.append(f"  {result['failed']}")
    if result.get("error"):
        lines.append(f"  does not parse: {result['error']}")
    for k in result["knobs"]:
        if k["change"] == "added":
            lines.append(f"  {k['name']}: (new) {k['new_text']}")
        elif k["change"] == "removed":
            lines.append(f"  {k['name']}: {k['old_text']} -> (removed)")
        else:
            lines.append(f"  {k['name']}: {k['old_text']} -> {k['new_text']}")
    for kind in ("added", "removed", "changed"):
        names = result["functions"][kind]
        if names:
            lines.append(f"  functions {kind}: {', '.join(names)}")
    for kind in ("added", "removed"):
        lines.extend(f"  module code {kind}: {text}" for text in result["module"][kind])
    if not (result["knobs"] or any(result["functions"].values()) or any(result["module"].values())
            or result.get("error") or result.get("failed")):
        lines.append("  no code changes")
    n = result["lines"]
    delta = "?" if n["delta"] is None else f"{n['delta']:+d}"
    lines.append(f"  lines: {n['old']} -> {n['new']} ({delta})"
                 + (f", not counted: {n['uncounted']}" if n.get("uncounted") else ""))
    lines.append("")
    if result["warnings"]:
        lines.append("Tradeoff warnings:")
        lines.extend(f"  - {w['message']}" for w in result["warnings"])
    else:
        lines.append("Tradeoff warnings: none")
    return lines


def format_report(vs_baseline, vs_champion=None):
    """The change report printed before the figures.

    Args:
        vs_baseline: compare(baseline source, current source).
        vs_champion: compare(champion source, current source), or None when there is no
            champion or it is the baseline itself.
    """
    try:
        lines = _section("CHANGES FROM BASELINE", vs_baseline)
        if vs_champion is not None:
            lines += _section("CHANGES FROM CHAMPION", vs_champion)
    except Exception as exc:  # noqa: BLE001 - the report must not end the run
        lines = ["=" * RULE_WIDTH, " ".join(f"change monitor failed: {type(exc).__name__}: {exc}".split())[:200]]
    lines.append("=" * RULE_WIDTH)
    return "\n".join(lines)
