"""The knobs of inference.py: read them, compare their values, show them, patch them.

A knob is a module-level assignment to an UPPER_CASE name (`TEMP = 0.7`, `A: int = 1`,
`A, B = 1, 2`). Its value is the Python literal on the right, or, when the right-hand
side is not a literal (`DTYPE = mx.float16`), an `Expr` holding its source text. When a
name is assigned twice the later assignment wins, as when Python runs the file.

The change monitor (harness.monitor) and the search (harness.search*) both read knobs
here, so "what is a knob" and "are two values the same" mean one thing everywhere:

    read(source) -> {name: Assignment}       values(source) -> {name: value}
    settable(source) -> {name: value}         the knobs the search can set and patch
    same(a, b), show(value), literal(value)   compare, show to people, write as source
    patched_source(source, params), make_patch(source, params)
    parse(source) -> ast.parse(source), huge ints made BigInt (written in hex, never in decimal)
"""

import ast
import difflib
import io
import json
import re
from dataclasses import dataclass

KNOB_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")
# Python refuses to write an int of more than 4300 digits in decimal (ValueError: a 5000-digit
# hex literal once crashed the harness: no row), and takes quadratic time to where allowed. The
# harness writes any int of more than BIG_INT_BITS bits (about 1200 digits) in hex instead.
BIG_INT_BITS = 4096


class Expr(str):
    """A knob value that is not a literal: its source text (compared as text)."""


class BigInt(int):
    """A huge int constant in a tree from parse(): ast.dump and ast.unparse write it in hex."""

    def __repr__(self):
        return hex(self)


def is_big_int(value):
    """An int (not a bool) of more than BIG_INT_BITS bits: shown in hex, never in decimal."""
    return isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > BIG_INT_BITS


def has_big_int(value):
    """`value`, or a list, tuple, set or dict in it, holds an is_big_int()."""
    if isinstance(value, (list, tuple, set, frozenset)):
        return any(has_big_int(v) for v in value)
    if isinstance(value, dict):
        return any(has_big_int(k) or has_big_int(v) for k, v in value.items())
    return is_big_int(value)


def parse(source):
    """ast.parse(source) with every huge int constant a BigInt, so that ast.dump and
    ast.unparse of the tree never write it in decimal. Raises SyntaxError."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and is_big_int(node.value):
            node.value = BigInt(node.value)
    return tree


class KnobError(ValueError):
    """A patch names a knob the source does not have; str(e) is one line."""


@dataclass(frozen=True)
class Assignment:
    """One knob as a source sets it.

    value is the literal value or an Expr. line is the 1-based line where the value
    starts; start/end are character offsets of the value in that line, None when the
    value spans several lines (then it cannot be patched in place).
    """
    name: str
    value: object
    line: int
    start: int | None
    end: int | None

    @property
    def settable(self):
        """A literal on one line: the search may set it by name and patch it."""
        return not isinstance(self.value, Expr) and self.start is not None


def is_knob_name(name):
    """True for an UPPER_CASE name (a letter first, then letters, digits, underscores)."""
    return bool(KNOB_NAME.match(name))


def assignments(tree):
    """(name, value node) for every module-level knob assignment of `tree`, in file order."""
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        for target in targets:
            if isinstance(target, ast.Name):
                pairs = [(target, value)]
            elif (isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple)
                  and len(target.elts) == len(value.elts)):
                pairs = zip(target.elts, value.elts)  # A, B = 1, 2
            else:
                continue
            for name, val in pairs:
                if isinstance(name, ast.Name) and is_knob_name(name.id):
                    yield name.id, val


def is_knob_statement(node):
    """True for a top-level statement that only sets knobs (compared as knobs, not as code)."""
    if isinstance(node, ast.Assign):
        targets = node.targets
    elif isinstance(node, ast.AnnAssign):
        targets = [node.target]
    else:
        return False
    names = [t for target in targets
             for t in (target.elts if isinstance(target, ast.Tuple) else [target])]
    return all(isinstance(t, ast.Name) and is_knob_name(t.id) for t in names)


def value_of(node):
    """The literal value of expression `node`, or its source text as an Expr."""
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return Expr(ast.unparse(node))


def _lines(source):
    """The lines of `source` as Python numbers them (str.splitlines also splits at form
    feeds and other separators that may sit inside a string literal)."""
    return io.StringIO(source, newline="").readlines()


def read(source, tree=None):
    """Every knob of `source` (an inference.py) as {name: Assignment}, in file order.

    `tree` is `parse(source)` when the caller has parsed it already.
    Raises SyntaxError when `source` does not parse.
    """
    tree = parse(source) if tree is None else tree
    lines = _lines(source)
    found = {}
    for name, node in assignments(tree):
        start = end = None
        if node.lineno == node.end_lineno:
            # ast offsets count UTF-8 bytes; the patch needs characters of the line
            raw = lines[node.lineno - 1].encode()
            start = len(raw[:node.col_offset].decode())
            end = len(raw[:node.end_col_offset].decode())
        found[name] = Assignment(name, value_of(node), node.lineno, start, end)
    return found


def values(source, tree=None):
    """{name: value} of every knob of `source` (Expr for non-literals). Raises SyntaxError.

    `tree` is `parse(source)` when the caller has parsed it already.
    """
    return {name: a.value for name, a in read(source, tree).items()}


def settable(source):
    """{name: value} of the knobs the search can set by name and patch: literals on one
    line. Raises SyntaxError."""
    return {name: a.value for name, a in read(source).items() if a.settable}


# ---------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------
def is_number(value):
    """An int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def same(a, b):
    """Whether `a` and `b` are the same knob value.

    Numbers compare as numbers, exactly, so 1 == 1.0 (rewriting 64 as 64.0 is no change;
    an int too large for a float is still compared).
    Everything else must also have the same type: True is not 1, None is not 0,
    "4" is not 4, a list is not a tuple, an Expr is not the string it spells.
    Lists, tuples and dicts compare element by element with these rules.
    """
    if is_number(a) and is_number(b):
        return a == b
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def show(value):
    """A knob value as people read it, on one line: literals as Python writes them,
    expressions as written; huge ints in hex (is_big_int)."""
    text = str(value) if isinstance(value, Expr) else _repr(value)
    return " ".join(text.split())


def _repr(value):
    """repr(value), but huge ints (is_big_int) in hex, also inside lists, tuples, sets and dicts."""
    if not has_big_int(value):
        return repr(value)
    if is_big_int(value):
        return hex(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_repr(k)}: {_repr(v)}" for k, v in value.items()) + "}"
    items = ", ".join(_repr(v) for v in value)
    if isinstance(value, list):
        return f"[{items}]"
    if isinstance(value, tuple):
        return f"({items}{',' if len(value) == 1 else ''})"
    return f"{type(value).__name__}({{{items}}})" if isinstance(value, frozenset) else f"{{{items}}}"


def literal(value):
    """`value` as Python source, strings in double quotes like inference.py's."""
    if isinstance(value, str):
        return json.dumps(value)
    return _repr(value)


# ---------------------------------------------------------------------------
# Patching
# ---------------------------------------------------------------------------
def patched_source(source, params):
    """`source` with each knob in `params` set to its value, comments kept.

    Only the literal changes (a knob whose value is already the same() is left as
    written); the spaces before an inline comment shrink or grow so the comment stays
    in its column where it can. Raises KnobError for a name that is not a settable knob.
    """
    found = read(source)
    changes = []
    for name, value in params.items():
        knob = found.get(name)
        if knob is None or not knob.settable:
            raise KnobError(f"inference.py has no knob {name} set by a one-line literal: cannot patch it")
        if not same(knob.value, value):
            changes.append((knob, value))
    # right to left, so a change does not move the offsets of one still to come (A, B = 1, 2)
    changes.sort(key=lambda change: (change[0].line, change[0].start), reverse=True)
    lines = _lines(source)
    for knob, value in changes:
        line = lines[knob.line - 1]
        old, new = line[knob.start:knob.end], literal(value)
        rest = line[knob.end:]
        pad = re.match(r"( +)#", rest)
        if pad:
            width = len(pad.group(1))
            keep = max(width - (len(new) - len(old)), min(width, 2))
            rest = " " * keep + rest[width:]
        lines[knob.line - 1] = line[:knob.start] + new + rest
    return "".join(lines)


def make_patch(source, params, path="inference.py"):
    """A unified diff (for `git apply`) setting `params` in `source`; "" when nothing changes."""
    new = patched_source(source, params)
    if new == source:
        return ""
    diff = difflib.unified_diff(_lines(source), _lines(new),
                                fromfile=f"a/{path}", tofile=f"b/{path}")
    return "".join(diff)
