"""The size of inference.py's code, and whether it can be trusted: what the "simpler" rule
and the re-roll pooling read.

    code_lines(source) -> statements of the syntax tree (no docstrings, comments, blank lines)
    uncountable(source) -> "" or why its line count cannot be trusted (code hidden in data)
    uncounted_lines(old, new) -> the same for a change (also: constants, or the syntax tree, that grew)
    code_hash(source) -> sha256 hex of its syntax tree without docstrings (same code, same hash)
"""

import ast
import hashlib
import io
import math
import tokenize
from dataclasses import dataclass

from harness.knobs import Expr, parse, values


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
# Modules that turn data into code (importlib, imp, runpy, code, codeop, marshal, pickle,
# types, ctypes, zipimport, site, py_compile, compileall; builtins reaches exec by name;
# pydoc.locate, pkgutil.resolve_name, operator's getters and inspect reach any object by a
# string; so do setuptools' and pkg_resources' entry points and pydantic's ImportString), run a
# file as a program (subprocess, multiprocessing, pty), run templates that reach any object
# (jinja2, unsandboxed), reach the harness that shares the worker's process (harness.child
# imports and runs files) or decompress / decode data (zlib, lzma, bz2, gzip, base64,
# binascii, codecs). A pipeline has no use for them.
CODE_MODULES = {"builtins", "importlib", "imp", "_imp", "_frozen_importlib", "_frozen_importlib_external",
                "runpy", "code", "codeop", "marshal", "pickle", "types", "ctypes", "zipimport", "site",
                "py_compile", "compileall", "pydoc", "pkgutil", "operator", "inspect",
                "subprocess", "_posixsubprocess", "multiprocessing", "pty", "harness", "__main__",
                "jinja2", "pkg_resources", "setuptools", "distutils", "pydantic",
                "timeit", "doctest", "trace", "profile", "cProfile", "pdb", "unittest",  # they run strings
                "zlib", "lzma", "bz2", "gzip", "base64", "binascii", "codecs"}
# Names that run a string, or hand out the namespaces where exec and eval live.
CODE_NAMES = {"exec", "eval", "compile", "__import__", "__builtins__", "globals", "vars", "locals"}
# Attributes that lead from any object to builtins, globals, frames or code objects (`print.__self__`
# is the builtins module), that import or run a file (also as another module's attribute: a
# library's own `importlib`), start programs, change where modules are imported from, or
# have a loader run code shipped with its files. Not `.eval` or `.compile`: mx.eval,
# mx.compile, re.compile. Module names count as attributes too (`mlx_lm.utils.importlib`).
CODE_ATTRIBUTES = {"exec", "__import__", "__builtins__", "__self__", "__globals__", "__code__",
                   "__dict__", "__subclasses__", "__getattribute__", "__loader__",
                   "_getframe", "f_builtins", "f_globals", "f_locals", "f_code", "f_back", "tb_frame",
                   "gi_frame", "gi_code", "cr_frame", "cr_code", "ag_frame", "ag_code",
                   "get_objects", "get_referrers", "get_referents", "get_field",
                   "meta_path", "path_hooks", "path_importer_cache", "import_module", "exec_module",
                   "load_module", "module_from_spec", "spec_from_file_location", "spec_from_loader",
                   "source_to_code", "load_source", "run_path", "run_module", "_import_inference",
                   "system", "popen", "fork", "forkpty", "posix_spawn", "posix_spawnp",
                   "execl", "execle", "execlp", "execlpe", "execv", "execve", "execvp", "execvpe",
                   "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
                   "dictConfig", "fileConfig",  # logging.config: builds objects named by strings
                   "trust_remote_code", "allow_pickle", "read_pickle"}
# Words too ordinary as strings ({"role": "system"}, `if __name__ == "__main__"`) and, for the
# module names, as attributes (np.trace, x.code).
PLAIN_WORDS = {"code", "types", "operator", "trace", "profile", "system", "fork", "popen", "__main__"}
# A string naming one of those is how `sys.modules["builtins"]` or getattr(f, "__globals__")
# reach them; a dotted name counts by its first part ("harness.child", "importlib.util").
CODE_STRINGS = (CODE_NAMES | CODE_ATTRIBUTES | CODE_MODULES | {"sys"}) - PLAIN_WORDS
# What sys holds that decides where `import` finds modules (a folder the pipeline wrote to).
IMPORT_PATHS = {"path", "meta_path", "path_hooks", "path_importer_cache"}
_ATTRIBUTE_CALLS = {"getattr", "setattr", "delattr", "hasattr"}
STRING_GROWTH_LIMIT = 200   # constants grown by more than this (constant_size): the count is not trusted
# A removed statement takes at least this many nodes with it (`import x`: 2, `x = 1`: 4);
# statements folded into one expression (a tuple of side effects, walrus, `and` chains) do not.
NODES_PER_REMOVED_STATEMENT = 2
TREE_GROWTH_LIMIT = 200     # syntax-tree nodes grown by more than this with no more statements: the same
LONGEST_NAME = 48           # a longer identifier is data (a red team hex-encoded the pipeline in one)


def _docstring_constants(tree):
    """The ids of the string constants that are whole statements: docstrings (and strings
    used as comments), which code_lines does not count and nothing can run."""
    return {id(node.value) for node in ast.walk(tree) if _is_docstring(node)}


def _constant_size(value):
    """The data in one constant: the bytes of a str (UTF-8: a character may carry 21 bits) or
    bytes, the decimal digits of an int (from its bit length: a huge int is never written in
    decimal), the characters of a float or complex as Python writes it (0.7: 3, and up to 17
    digits of data), 1 for anything else (True, None, ...)."""
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, bytes):
        return len(value)
    if isinstance(value, int) and not isinstance(value, bool) and value:
        return int(abs(value).bit_length() * math.log10(2)) + 1
    if isinstance(value, (float, complex)):
        return len(repr(value))
    return 1


def constant_size(source):
    """How much data `source` holds in constants (_constant_size): its str and bytes constants
    that are not docstrings (f-string parts included) by their bytes, its ints by their digits
    (eight hex literals once carried a hundred lines), its floats by their characters, and one
    per other constant (a table of character codes is data too); 0 when it does not parse."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return 0
    skip = _docstring_constants(tree)
    return sum(_constant_size(node.value) for node in ast.walk(tree)
               if isinstance(node, ast.Constant) and id(node) not in skip)


def tree_size(source):
    """The nodes of `source`'s syntax tree (0 when it does not parse): data needs no
    constants to hide in expressions (a tuple of names, of lambdas), only nodes."""
    try:
        return sum(1 for _ in ast.walk(ast.parse(source)))
    except SyntaxError:
        return 0


def _rebound_names(tree):
    """Names bound more than once, augmented (`A += "x"`) or declared global anywhere: their
    value is not the literal they start with (a red team built "__globals__" that way)."""
    counts, changed = {}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            counts[node.id] = counts.get(node.id, 0) + 1
        elif isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name):
            changed.add(node.target.id)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            changed.update(node.names)
    return changed | {name for name, n in counts.items() if n > 1}


def _is_literal_knob(node, knobs):
    """`node` is an UPPER_CASE knob name whose value is a plain string literal (getattr(mx, COMPUTE_DTYPE))."""
    return (isinstance(node, ast.Name) and node.id in knobs
            and isinstance(knobs[node.id], str) and not isinstance(knobs[node.id], Expr))


def uncountable(source):
    """"" when code_lines(source) can be trusted, else one line saying why not: code that can
    run data as code (exec, eval, compile, __import__, the namespaces and modules that lead to
    them, getattr with a computed name or passed as a value, sys.modules looked up by a
    computed name, sys.path and the other import hooks). Source that does not parse cannot be
    counted either."""
    try:
        tree = parse(source)
    except SyntaxError as exc:
        return f"it does not parse (line {exc.lineno})"
    rebound = _rebound_names(tree)
    knobs = {name: value for name, value in values(source, tree).items() if name not in rebound}
    seen = _Seen(docstrings=_docstring_constants(tree), knobs=knobs,
                 called={id(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)},
                 sys_names=_sys_names(tree), tree=tree)
    for node in ast.walk(tree):
        name = _identifier(node)
        if name and len(name) > LONGEST_NAME:
            return f"it has an identifier of {len(name)} characters (more than {LONGEST_NAME}: data, not a name)"
        reason = _import_reason(node) or _name_reason(node, seen) or _call_reason(node, seen)
        if reason:
            return reason
    return ""


@dataclass
class _Seen:
    """What uncountable() learns about the whole tree before it looks at each node."""
    docstrings: set   # ids of docstring constants
    knobs: dict       # the knobs' values
    called: set       # ids of the expressions that are called (f in f(...))
    sys_names: set    # names bound to the sys module
    tree: ast.AST


def _sys_names(tree):
    """The names `import sys` (or `import sys as s`) binds anywhere in `tree`."""
    return {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
            for alias in node.names if alias.name == "sys"}


def _is_sys(node, seen):
    """`node` is the sys module: a name bound to it, or `os.sys`."""
    return ((isinstance(node, ast.Name) and node.id in seen.sys_names)
            or (isinstance(node, ast.Attribute) and node.attr == "sys"))


def _import_reason(node):
    """Why an import makes the count untrustworthy, or ""."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name.split(".")[0] in CODE_MODULES:
                return f"it imports {alias.name} (turns data into code, or unpacks it)"
    elif isinstance(node, ast.ImportFrom):
        if (node.module or "").split(".")[0] in CODE_MODULES:
            return f"it imports from {node.module} (turns data into code, or unpacks it)"
        for alias in node.names:
            if node.module == "sys" and alias.name in IMPORT_PATHS | {"modules"}:
                return f"it imports sys.{alias.name} (changes where modules are imported from)"
            if alias.name in CODE_STRINGS:
                return f"it imports {alias.name} from {node.module} (runs data as code, or reaches what does)"
    return ""


def _name_reason(node, seen):
    """Why a name, attribute, keyword or string makes the count untrustworthy, or ""."""
    if isinstance(node, ast.Name) and node.id in CODE_NAMES:
        return f"it uses {node.id} (runs a string as code, or reaches what does)"
    if isinstance(node, ast.Name) and node.id in _ATTRIBUTE_CALLS and id(node) not in seen.called:
        return f"it passes {node.id} as a value (attribute names computed elsewhere)"
    if isinstance(node, ast.Attribute) and node.attr in IMPORT_PATHS and (
            node.attr != "path" or _is_sys(node.value, seen)):
        return f"it uses sys.{node.attr} (changes where modules are imported from)"
    if isinstance(node, ast.Attribute) and node.attr in CODE_ATTRIBUTES | (CODE_MODULES - PLAIN_WORDS):
        return f"it uses .{node.attr} (reaches builtins, globals, code objects, or runs files)"
    if isinstance(node, ast.keyword) and node.arg in CODE_ATTRIBUTES:
        return f"it passes {node.arg}= (a loader runs code shipped with its files)"
    if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in seen.docstrings
            and (node.value in CODE_STRINGS or node.value.split(".")[0] in CODE_STRINGS)):
        return f"it names {node.value!r} in a string"
    if (isinstance(node, ast.Attribute) and node.attr == "modules"
            and getattr(node.value, "id", None) == "sys"):
        if not _is_subscripted_by_literal(node, seen.tree):
            return "it looks up sys.modules by a computed name"
    return ""


def _call_reason(node, seen):
    """Why a getattr-like call makes the count untrustworthy (a computed name, sys.path), or ""."""
    if not (isinstance(node, ast.Call) and getattr(node.func, "id", None) in _ATTRIBUTE_CALLS):
        return ""
    name = node.args[1] if len(node.args) > 1 else None
    literal = isinstance(name, ast.Constant) and isinstance(name.value, str)
    if not literal and not _is_literal_knob(name, seen.knobs):
        return f"{node.func.id}() with a computed attribute name: {ast.unparse(node)[:60]}"
    if literal and name.value in IMPORT_PATHS and _is_sys(node.args[0], seen):
        return f"it uses sys.{name.value} (changes where modules are imported from)"
    return ""


def _identifier(node):
    """The name `node` introduces or uses, if any (variables, attributes, functions, classes,
    arguments, imports' aliases)."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return node.name
    if isinstance(node, ast.arg):
        return node.arg
    if isinstance(node, ast.alias):
        return node.asname or node.name
    if isinstance(node, (ast.keyword, ast.ExceptHandler, ast.MatchAs, ast.MatchStar)):
        return getattr(node, "arg", None) or getattr(node, "name", None)
    return None


def _is_subscripted_by_literal(node, tree):
    """`node` (sys.modules) is used only as `sys.modules["a literal"]`."""
    for parent in ast.walk(tree):
        if isinstance(parent, ast.Subscript) and parent.value is node:
            return isinstance(parent.slice, ast.Constant) and isinstance(parent.slice.value, str)
    return False


def uncounted_lines(old_source, new_source):
    """Why the line delta from `old_source` to `new_source` cannot be trusted, or "": the new
    source is uncountable(), or its constants grew by more than STRING_GROWTH_LIMIT
    (constant_size: code moved into data), or its syntax tree grew by more than
    TREE_GROWTH_LIMIT nodes with no more statements (tree_size: code packed into expressions)."""
    reason = uncountable(new_source)
    if reason:
        return reason
    grown = constant_size(new_source) - constant_size(old_source)
    if grown > STRING_GROWTH_LIMIT:
        return f"its constants grew by {grown} characters, digits and numbers (more than {STRING_GROWTH_LIMIT})"
    nodes = tree_size(new_source) - tree_size(old_source)
    fewer = code_lines(old_source) - code_lines(new_source)
    if nodes > TREE_GROWTH_LIMIT and fewer >= 0:
        return (f"its syntax tree grew by {nodes} nodes (more than {TREE_GROWTH_LIMIT}) with no more "
                f"statements (data in expressions)")
    if fewer > 0 and -nodes < NODES_PER_REMOVED_STATEMENT * fewer:
        return (f"{fewer} fewer statements, but the syntax tree changed by only {nodes:+d} nodes (a removed "
                f"statement takes {NODES_PER_REMOVED_STATEMENT} or more: code packed into expressions)")
    return ""


def code_hash(source):
    """The sha256 (hex) of `source`'s syntax tree without docstrings and positions: edits of
    comments, docstrings, blank lines and line breaks keep it, any change to the code does
    not. Source that does not parse, or nests too deep for ast.dump (an expression of ~1000
    terms compiles but made the run exit with a RecursionError and no row), hashes as its
    text. (Huge ints are dumped in hex: knobs.parse.)"""
    as_text = hashlib.sha256(source.encode(errors="surrogateescape")).hexdigest()
    try:
        tree = parse(source)
    except (SyntaxError, RecursionError, MemoryError):
        return as_text
    for node in ast.walk(tree):
        for name in ("body", "orelse", "finalbody"):  # every statement list (handlers have a body)
            statements = getattr(node, name, None)
            if isinstance(statements, list):
                setattr(node, name, [n for n in statements if not _is_docstring(n)])
    try:
        return hashlib.sha256(ast.dump(tree).encode()).hexdigest()
    except RecursionError:
        return as_text


def _is_docstring(node):
    """A statement that is only a string: a docstring (or a string used as a comment)."""
    return (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str))


def without_comments_and_docstrings(source):
    """`source` as a worker runs it: comments removed and docstrings blanked (spaces, their
    line breaks kept), so every line keeps its number for tracebacks. What runs is then
    fixed by code_hash alone: a pipeline cannot read instructions from its own comments or
    docstrings (open(__file__), __doc__), and re-runs of the same code may pool their pairs.
    Source that cannot be tokenized is returned as it is (it will not import either)."""
    try:
        tree = ast.parse(source)
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (SyntaxError, tokenize.TokenError, ValueError):
        return source
    lines = _lines(source)  # as the tokenizer counts rows (str.splitlines also splits at \x0c, \x1c, ...)

    def char_col(row, byte_col):  # the AST counts UTF-8 bytes, tokenize characters
        return len(lines[row - 1].encode()[:byte_col].decode(errors="ignore"))

    docstrings = [(n.value.lineno, char_col(n.value.lineno, n.value.col_offset),
                   n.value.end_lineno, char_col(n.value.end_lineno, n.value.end_col_offset))
                  for n in ast.walk(tree) if _is_docstring(n)]
    edits = []
    for tok in tokens:
        if tok.type == tokenize.COMMENT:
            edits.append((tok.start, tok.end, ""))
        elif tok.type == tokenize.STRING and any((r0, c0) <= tok.start and tok.end <= (r1, c1)
                                                 for r0, c0, r1, c1 in docstrings):
            edits.append((tok.start, tok.end, _blanked_string(tok.string)))
    for (row, col), (end_row, end_col), text in reversed(edits):
        head, tail = lines[row - 1][:col], lines[end_row - 1][end_col:]
        lines[row - 1:end_row] = _lines(head + text + tail) or [""]
    result = "".join(lines)
    try:
        same = code_hash(result) == code_hash(source) and result.count("\n") == source.count("\n")
    except RecursionError:
        same = False
    return result if same else source


def _lines(text):
    """`text`'s lines, line breaks kept, split at \\n only, as tokenize reads them."""
    return io.StringIO(text).readlines()


def _blanked_string(literal):
    """A string literal with the same prefix, quotes and line breaks, its text made spaces."""
    prefix = len(literal) - len(literal.lstrip("rRbBuUfF"))
    quote = 3 if literal[prefix:prefix + 3] in ('"""', "'''") else 1
    body = literal[prefix + quote:len(literal) - quote]
    kept = "".join(c if c == "\n" or (c == "\\" and body[i + 1:i + 2] == "\n") else " "
                   for i, c in enumerate(body))
    return literal[:prefix + quote] + kept + literal[len(literal) - quote:]
