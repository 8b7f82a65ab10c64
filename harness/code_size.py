"""The size of inference.py's code, and whether it can be trusted: what the "simpler" rule
and the re-roll pooling read.

    code_lines(source) -> statements of the syntax tree (no docstrings, comments, blank lines)
    uncountable(source) -> "" or why its line count cannot be trusted (code hidden in data)
    uncounted_lines(old, new) -> the same for a change (also: string constants that grew)
    code_hash(source) -> sha256 hex of its syntax tree without docstrings (same code, same hash)
"""

import ast
import hashlib

from harness.knobs import Expr, values


def code_lines(source):
    """The size of the code: its statements, as the syntax tree has them.

    Comments, docstrings and blank lines are not code, and a statement is one whether it
    spans three lines or shares one with another after a `;` — so "simpler" cannot be
    won by deleting docstrings or joining lines. Source that does not parse falls back
    to the lines that are neither blank nor comment-only.
    """
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return sum(1 for line in source.splitlines() if line.strip() and not line.strip().startswith("#"))
    return sum(1 for node in ast.walk(tree) if isinstance(node, ast.stmt) and not _is_docstring(node))


# ---------------------------------------------------------------------------
# Code the line count cannot see
# ---------------------------------------------------------------------------
# code_lines counts statements, so code kept as data (a string run by exec, a compressed or
# encoded blob) counts as one line: "simpler" would be won by hiding the pipeline in a
# string. uncountable() is a tripwire for the direct ways to run data as code; it is not a
# proof (Python has too many doors), and a false alarm costs only the "simpler" credit,
# never a speed KEEP, so it errs on the side of flagging.
#
# Modules that turn data into code (importlib, runpy, code, codeop, marshal, pickle, types,
# ctypes, zipimport; builtins reaches exec by name) or decompress / decode it (zlib, lzma,
# bz2, gzip, base64, binascii, codecs). A pipeline has no use for them.
CODE_MODULES = {"builtins", "importlib", "runpy", "code", "codeop", "marshal", "pickle", "types", "ctypes",
                "zipimport", "zlib", "lzma", "bz2", "gzip", "base64", "binascii", "codecs"}
# Names that run a string, or hand out the namespaces where exec and eval live.
CODE_NAMES = {"exec", "eval", "compile", "__import__", "__builtins__", "globals", "vars", "locals"}
# Attributes that lead from any object to builtins, globals or code objects (`print.__self__`
# is the builtins module). Not `.eval` or `.compile`: mx.eval, mx.compile, re.compile.
CODE_ATTRIBUTES = {"exec", "__import__", "__builtins__", "__self__", "__globals__", "__code__",
                   "__dict__", "__subclasses__", "__getattribute__", "__loader__"}
# A string naming one of those is how `sys.modules["builtins"]` or getattr(f, "__globals__") reach them.
CODE_STRINGS = CODE_NAMES | CODE_ATTRIBUTES | (CODE_MODULES - {"code", "types"})  # not two ordinary words
_ATTRIBUTE_CALLS = {"getattr", "setattr", "delattr", "hasattr"}
STRING_GROWTH_LIMIT = 200   # more new characters in string constants than this: the count is not trusted


def _docstring_constants(tree):
    """The ids of the string constants that are whole statements: docstrings (and strings
    used as comments), which code_lines does not count and nothing can run."""
    return {id(node.value) for node in ast.walk(tree) if _is_docstring(node)}


def string_chars(source):
    """Characters in the str and bytes constants of `source` that are not docstrings (f-string
    parts included); 0 when it does not parse."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return 0
    skip = _docstring_constants(tree)
    return sum(len(node.value) for node in ast.walk(tree)
               if isinstance(node, ast.Constant) and isinstance(node.value, (str, bytes)) and id(node) not in skip)


def _is_literal_knob(node, knobs):
    """`node` is an UPPER_CASE knob name whose value is a plain string literal (getattr(mx, COMPUTE_DTYPE))."""
    return (isinstance(node, ast.Name) and node.id in knobs
            and isinstance(knobs[node.id], str) and not isinstance(knobs[node.id], Expr))


def uncountable(source):
    """"" when code_lines(source) can be trusted, else one line saying why not: code that can
    run data as code (exec, eval, compile, __import__, the namespaces and modules that lead to
    them, getattr with a computed name, sys.modules looked up by a computed name). Source that
    does not parse cannot be counted either."""
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        return f"it does not parse (line {exc.lineno})"
    docstrings = _docstring_constants(tree)
    knobs = values(source, tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in CODE_MODULES:
                    return f"it imports {alias.name} (turns data into code, or unpacks it)"
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in CODE_MODULES:
            return f"it imports from {node.module} (turns data into code, or unpacks it)"
        elif isinstance(node, ast.Name) and node.id in CODE_NAMES:
            return f"it uses {node.id} (runs a string as code, or reaches what does)"
        elif isinstance(node, ast.Attribute) and node.attr in CODE_ATTRIBUTES:
            return f"it uses .{node.attr} (reaches builtins, globals or code objects)"
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in CODE_STRINGS
              and id(node) not in docstrings):
            return f"it names {node.value!r} in a string"
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in _ATTRIBUTE_CALLS:
            name = node.args[1] if len(node.args) > 1 else None
            literal = isinstance(name, ast.Constant) and isinstance(name.value, str)
            if not literal and not _is_literal_knob(name, knobs):
                return f"{node.func.id}() with a computed attribute name: {ast.unparse(node)[:60]}"
        elif (isinstance(node, ast.Attribute) and node.attr == "modules"
              and getattr(node.value, "id", None) == "sys"):
            if not _is_subscripted_by_literal(node, tree):
                return "it looks up sys.modules by a computed name"
    return ""


def _is_subscripted_by_literal(node, tree):
    """`node` (sys.modules) is used only as `sys.modules["a literal"]`."""
    for parent in ast.walk(tree):
        if isinstance(parent, ast.Subscript) and parent.value is node:
            return isinstance(parent.slice, ast.Constant) and isinstance(parent.slice.value, str)
    return False


def uncounted_lines(old_source, new_source):
    """Why the line delta from `old_source` to `new_source` cannot be trusted, or "": the new
    source is uncountable(), or its string constants grew by more than STRING_GROWTH_LIMIT
    characters (code moved into data)."""
    reason = uncountable(new_source)
    if reason:
        return reason
    grown = string_chars(new_source) - string_chars(old_source)
    if grown > STRING_GROWTH_LIMIT:
        return f"its string constants grew by {grown} characters (more than {STRING_GROWTH_LIMIT})"
    return ""


def code_hash(source):
    """The sha256 (hex) of `source`'s syntax tree without docstrings and positions: edits of
    comments, docstrings, blank lines and line breaks keep it, any change to the code does
    not. Source that does not parse hashes as its text."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return hashlib.sha256(source.encode()).hexdigest()
    for node in ast.walk(tree):
        for name in ("body", "orelse", "finalbody"):  # every statement list (handlers have a body)
            statements = getattr(node, name, None)
            if isinstance(statements, list):
                setattr(node, name, [n for n in statements if not _is_docstring(n)])
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()


def _is_docstring(node):
    """A statement that is only a string: a docstring (or a string used as a comment)."""
    return (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str))
