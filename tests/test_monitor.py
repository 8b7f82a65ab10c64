"""The change monitor on real edits of the real inference.py."""

from pathlib import Path

import pytest

from harness import code_size, monitor

BASELINE = (Path(__file__).resolve().parent.parent / "inference.py").read_text()


def edit(old, new, source=BASELINE):
    assert old in source, f"{old!r} not in inference.py"
    return source.replace(old, new, 1)


def ids(result):
    return [w["id"] for w in result["warnings"]]


def knob(result, name):
    return next(k for k in result["knobs"] if k["name"] == name)


def test_unchanged_source_has_no_changes():
    result = monitor.compare(BASELINE, BASELINE)
    assert result["knobs"] == [] and result["warnings"] == []
    assert result["functions"] == {"added": [], "removed": [], "changed": []}
    assert result["lines"]["delta"] == 0 and result["lines"]["old"] > 50
    assert result["summary"] == "no code changes; +0 lines"


@pytest.mark.parametrize("temp, shown", [("0", "0"), ("0.0", "0.0"), ("1e-9", "1e-09")])
def test_argmax_temperatures_warn(temp, shown):
    result = monitor.compare(BASELINE, edit("TEMP = 0.7 ", f"TEMP = {temp} "))
    assert "argmax" in ids(result)
    assert knob(result, "TEMP")["old"] == 0.7 and knob(result, "TEMP")["new"] == float(temp)
    assert result["summary"] == f"TEMP 0.7->{shown}; +0 lines; warnings: argmax"


def test_zero_to_tiny_temperature_is_still_argmax_but_a_change():
    zero = edit("TEMP = 0.7 ", "TEMP = 0 ")
    assert monitor.compare(zero, edit("TEMP = 0.7 ", "TEMP = 0.0 "))["knobs"] == []
    result = monitor.compare(zero, edit("TEMP = 0.7 ", "TEMP = 1e-9 "))
    assert [k["name"] for k in result["knobs"]] == ["TEMP"]


def test_sampler_replaced_by_argmax_in_code_warns():
    new = edit("    return pipeline.sampler(logprobs), logprobs[0]\n",
               "    return mx.argmax(logprobs, axis=-1), logprobs[0]\n")
    result = monitor.compare(BASELINE, new)
    assert "argmax" in ids(result) and result["functions"]["changed"] == ["_step"]


def test_moving_or_reordering_knobs_is_no_change():
    lines = BASELINE.splitlines(keepends=True)
    temp = next(i for i, line in enumerate(lines) if line.startswith("TEMP ="))
    top_p = next(i for i, line in enumerate(lines) if line.startswith("TOP_P ="))
    lines[temp], lines[top_p] = lines[top_p], lines[temp]  # reorder two knobs
    reordered = "".join(lines)
    # and move TEMP far away, below the class, with other spacing and a new comment
    moved = edit("TEMP = 0.7                 # sampling temperature; 0 = argmax (greedy)\n", "", reordered)
    moved = edit("\n\ndef _cast(", "\n\nTEMP=0.70   # moved here\n\n\ndef _cast(", moved)
    for new in (reordered, moved):
        result = monitor.compare(BASELINE, new)
        assert result["knobs"] == [] and result["warnings"] == [], result["summary"]
        assert result["lines"]["delta"] == 0


def test_int_and_float_are_the_same_value():
    new = edit("KV_GROUP_SIZE = 64 ", "KV_GROUP_SIZE = 64.0 ")
    new = edit("REPETITION_PENALTY = 1.0 ", "REPETITION_PENALTY = 1 ", new)
    assert monitor.compare(BASELINE, new)["knobs"] == []
    # but True is not 1 and None is not 0
    new = edit("TOP_K = 0 ", "TOP_K = False ")
    new = edit("CACHE_LIMIT_GB = None ", "CACHE_LIMIT_GB = 0    ", new)
    assert [k["name"] for k in monitor.compare(BASELINE, new)["knobs"]] == ["TOP_K", "CACHE_LIMIT_GB"]


def test_comment_only_edit_is_no_change():
    new = edit("def load(model_path", "# a new comment about loading\n\n\ndef load(model_path")
    new = edit("    dtype = getattr(mx, COMPUTE_DTYPE)\n",
               "    # cast after loading\n    dtype = getattr(mx, COMPUTE_DTYPE)  # why not\n\n", new)
    result = monitor.compare(BASELINE, new)
    assert result["knobs"] == [] and result["warnings"] == []
    assert result["functions"] == {"added": [], "removed": [], "changed": []}
    assert result["lines"]["delta"] == 0
    assert result["summary"] == "no code changes; +0 lines"


def test_quantized_kv_warns():
    result = monitor.compare(BASELINE, edit("KV_BITS = None ", "KV_BITS = 4    "))
    assert ids(result) == ["quantized_kv"]
    assert knob(result, "KV_BITS") == {"name": "KV_BITS", "change": "changed", "old": None,
                                       "new": 4, "old_text": "None", "new_text": "4"}


def test_rotating_window_warns():
    result = monitor.compare(BASELINE, edit("MAX_KV_SIZE = None ", "MAX_KV_SIZE = 512  "))
    assert ids(result) == ["rotating_kv"]


def test_lower_precision_warns():
    result = monitor.compare(BASELINE, edit('COMPUTE_DTYPE = "float32"', 'COMPUTE_DTYPE = "bfloat16"'))
    assert ids(result) == ["precision"]
    assert "COMPUTE_DTYPE 'float32'->'bfloat16'" in result["summary"]


def test_cache_limit_warns_when_set_or_lowered():
    set_once = edit("CACHE_LIMIT_GB = None ", "CACHE_LIMIT_GB = 2    ")
    assert "cache_limit" in ids(monitor.compare(BASELINE, set_once))
    lower = edit("CACHE_LIMIT_GB = 2 ", "CACHE_LIMIT_GB = 1 ", set_once)
    higher = edit("CACHE_LIMIT_GB = 2 ", "CACHE_LIMIT_GB = 4 ", set_once)
    assert "cache_limit" in ids(monitor.compare(set_once, lower))
    assert "cache_limit" not in ids(monitor.compare(set_once, higher))


def test_removed_eos_handling_warns():
    new = edit("            if stop_at_eos and token in eos:\n                return\n", "")
    result = monitor.compare(BASELINE, new)
    assert "eos" in ids(result) and result["functions"]["changed"] == ["generate"]
    # removing only the stop_at_eos test (the eos set is still built) warns too
    new = edit("if stop_at_eos and token in eos:", "if token in eos and False:")
    assert "eos" in ids(monitor.compare(BASELINE, new))


def test_compile_and_state_and_work_warn():
    compiled = edit("def _new_cache(", "@mx.compile\ndef _square(x):\n    return x * x\n\n\ndef _new_cache(")
    result = monitor.compare(BASELINE, compiled)
    assert ids(result) == ["compile"] and result["functions"]["added"] == ["_square"]
    assert result["lines"]["delta"] == 2  # statements: the def (decorator included) and its return

    cached = edit("def _new_cache(", "_answers = {}\n\n\ndef _new_cache(")
    result = monitor.compare(BASELINE, cached)
    assert ids(result) == ["state"] and result["module"]["added"] == ["_answers = {}"]

    shortened = edit("_decode(pipeline, cache, prompt, max_tokens=max_tokens)",
                     "_decode(pipeline, cache, prompt, max_tokens=min(max_tokens, 16))")
    assert "work" in ids(monitor.compare(BASELINE, shortened))


def test_functions_added_removed_changed():
    new = BASELINE.replace("_new_cache", "_fresh_cache")  # a rename: one added, one removed
    new = edit("    mx.eval(model.parameters())\n", "    mx.eval(model.parameters())\n    return model\n", new)
    result = monitor.compare(BASELINE, new)
    assert result["functions"]["added"] == ["_fresh_cache"]
    assert result["functions"]["removed"] == ["_new_cache"]
    assert sorted(result["functions"]["changed"]) == ["_cast", "generate", "score"]
    assert result["lines"]["delta"] == 1
    assert "changed _cast, generate, score" in result["summary"]


def test_deleting_code_shows_negative_line_delta():
    new = edit("        self.draft_model = draft_model\n", "")
    result = monitor.compare(BASELINE, new)
    assert result["lines"]["delta"] == -1 and result["functions"]["changed"] == ["Pipeline"]


def test_added_and_removed_knobs():
    new = edit("NUM_DRAFT_TOKENS = 3 ", "EXTRA_KNOB = (1, 2)  #")
    result = monitor.compare(BASELINE, new)
    assert [(k["name"], k["change"]) for k in result["knobs"]] == [
        ("NUM_DRAFT_TOKENS", "removed"), ("EXTRA_KNOB", "added")]
    assert "-NUM_DRAFT_TOKENS" in result["summary"] and "+EXTRA_KNOB=(1, 2)" in result["summary"]


def test_summary_is_one_line_without_tabs():
    new = edit('COMPUTE_DTYPE = "float32"', 'COMPUTE_DTYPE = "a\\tb\\nc"')
    new = edit("KV_BITS = None ", "KV_BITS = 8    ", new)
    new = edit("def _new_cache(", "import functools\n\n\ndef _helper(\n    x,\n):\n    return x\n\n\ndef _new_cache(", new)
    summary = monitor.compare(BASELINE, new)["summary"]
    assert "\t" not in summary and "\n" not in summary
    assert len(summary) <= monitor.SUMMARY_MAX_CHARS


def test_source_that_does_not_parse():
    result = monitor.compare(BASELINE, BASELINE + "\ndef broken(:\n")
    assert ids(result) == ["syntax"] and "does not parse" in result["summary"]
    assert "\n" not in result["summary"]


def test_format_report():
    new = edit("TEMP = 0.7 ", "TEMP = 0.0 ")
    new = edit("KV_BITS = None ", "KV_BITS = 8    ", new)
    champion = edit("TEMP = 0.7 ", "TEMP = 0 ")
    text = monitor.format_report(monitor.compare(BASELINE, new), monitor.compare(champion, new))
    assert "CHANGES FROM BASELINE" in text and "CHANGES FROM CHAMPION" in text
    baseline_part, champion_part = text.split("CHANGES FROM CHAMPION")
    assert "TEMP: 0.7 -> 0.0" in baseline_part and "KV_BITS: None -> 8" in baseline_part
    assert "Tradeoff warnings:" in baseline_part and "deterministic output" in baseline_part
    # vs the champion, argmax is not news (0 and 0.0 are the same); the KV cache is
    assert "TEMP" not in champion_part and "deterministic" not in champion_part
    assert "quantized KV cache" in champion_part
    assert monitor.format_report(monitor.compare(BASELINE, BASELINE)).count("CHANGES FROM") == 1


LOAD_END = "    _cast(model, dtype)\n    draft_model = None\n"


@pytest.mark.parametrize("code, imports", [
    ("    nn.quantize(model, group_size=64, bits=4)\n", "import mlx.nn as nn\n"),
    ("    w, scales, biases = mx.quantize(model.lm_head.weight, bits=4)\n", ""),
    ("    model, _config = quantize_model(model, {}, 64, 4)\n", "from mlx_lm.utils import quantize_model\n"),
    ("    model.lm_head = nn.QuantizedLinear.from_linear(model.lm_head)\n", "import mlx.nn as nn\n"),
])
def test_weight_requantization_warns(code, imports):
    new = edit(LOAD_END, LOAD_END.replace("    draft_model = None\n", code + "    draft_model = None\n"))
    new = edit("import mlx.core as mx\n", "import mlx.core as mx\n" + imports, new)
    result = monitor.compare(BASELINE, new)
    assert "requantize" in ids(result) and "patching" not in ids(result)
    assert "warnings: requantize" in result["summary"]


@pytest.mark.parametrize("code", [
    "import mlx_lm.generate\nmlx_lm.generate.generate_step = generate_step\n",
    "import mlx.nn as nn\nsetattr(nn.Linear, '__call__', lambda self, x: x @ self.weight.T)\n",
    "mx.fast.rms_norm = lambda x, w, eps: x\n",
    "KVCache.update_and_fetch = lambda self, k, v: (k, v)\n",
    "import sys\nsys.modules['mlx_lm.generate'].generate_step = None\n",
    "def load_patched(model):\n    type(model).__call__ = None\n",
])
def test_patching_library_code_warns(code):
    result = monitor.compare(BASELINE, BASELINE + "\n" + code)
    assert "patching" in ids(result)
    report = monitor.format_report(result)
    assert "mlx / mlx-lm patched at run time" in report


def test_new_warnings_stay_quiet_on_ordinary_code():
    assert not {"requantize", "patching"} & set(ids(monitor.compare(BASELINE, BASELINE)))
    facts = monitor.facts(BASELINE)
    assert facts.patches == set() and facts.uses(*monitor.REQUANTIZE_NAMES) == 0
    # attributes of the pipeline's own objects and KV-cache quantization are not library patches
    own = edit("    return Pipeline(model, tokenizer, draft_model)",
               "    pipeline = Pipeline(model, tokenizer, draft_model)\n    pipeline.fast = True\n"
               "    model.extra = None\n    return pipeline")
    own = edit("KV_BITS = None ", "KV_BITS = 8    ", own)
    warned = ids(monitor.compare(BASELINE, own))
    assert "patching" not in warned and "requantize" not in warned and "quantized_kv" in warned
    # a patch that was already in the champion does not warn again
    patched = BASELINE + "\nmx.fast.rms_norm = None\n"
    assert "patching" not in ids(monitor.compare(patched, patched + "\n# comment\n"))


def test_a_long_summary_keeps_its_line_delta_and_warnings():
    from harness import summary

    imports = "".join(f"import module_with_a_long_name_{i} as alias_{i}\n" for i in range(12))
    new = edit("import mlx.core as mx\n", "import mlx.core as mx\n" + imports)
    new = edit("TEMP = 0.7 ", "TEMP = 0.0 ", new)
    text = monitor.compare(BASELINE, new)["summary"]
    assert len(text) <= monitor.SUMMARY_MAX_CHARS and "..." in text
    assert text.endswith("; +12 lines; warnings: argmax")
    assert summary.lines_delta(text) == 12 and summary.warning_ids(text) == ["argmax"]


def test_lines_count_statements_not_docstrings_comments_or_line_breaks():
    """'Simpler' cannot be won by deleting docstrings or comments, or by joining lines."""
    import ast

    tree = ast.parse(BASELINE)
    docstrings = [n.body[0] for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and len(n.body) > 1
                  and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)]
    assert len(docstrings) > 5
    lines = BASELINE.splitlines(keepends=True)
    for node in sorted(docstrings, key=lambda n: -n.lineno):  # bottom up: line numbers stay valid
        del lines[node.lineno - 1:node.end_lineno]
    stripped = "".join(line for line in lines if not line.lstrip().startswith("#"))
    assert len(stripped) < 0.8 * len(BASELINE)
    assert monitor.compare(BASELINE, stripped)["lines"]["delta"] == 0
    joined = BASELINE.replace("TEMP = 0.7", "TEMP = 0.7; TOP_P = 0.9", 1).replace("\nTOP_P = 0.9", "\n", 1)
    assert joined.count("TOP_P = 0.9") == 1 and "; TOP_P" in joined
    assert monitor.compare(BASELINE, joined)["lines"]["delta"] == 0


# ---------------------------------------------------------------------------
# Code hidden in data: "simpler" must not be won by putting the pipeline in a string
# ---------------------------------------------------------------------------
def _hidden(wrapper):
    """BASELINE with all its code (not the module docstring) turned into a string and run by
    `wrapper`, a format string with {code}: the red team's "simpler: -N lines"."""
    import ast

    docstring_end = ast.parse(BASELINE).body[0].end_lineno
    lines = BASELINE.splitlines(keepends=True)
    head, code = "".join(lines[:docstring_end]), "".join(lines[docstring_end:])
    return head + "\n" + wrapper.format(code=repr(code)) + "\n"


@pytest.mark.parametrize("wrapper, why", [
    ("exec({code})", "uses exec"),
    ("import builtins\ngetattr(builtins, 'ex' + 'ec')({code})", "imports builtins"),
    ("getattr(__builtins__, 'ex' + 'ec')({code})", "getattr() with a computed attribute name"),
    ("_b = print.__self__\n_b.__dict__['ex' + 'ec']({code})", ".__self__"),
    ("import sys\n_b = sys.modules['builtins']\n_b.__dict__['ex' + 'ec']({code})", "names 'builtins'"),
    ("globals()['__buil' + 'tins__']['ex' + 'ec']({code})", "uses globals"),
    ("import importlib\nimportlib.import_module('bui' + 'ltins').exec({code})", "imports importlib"),
])
def test_code_run_from_a_string_is_not_counted(wrapper, why):
    new = _hidden(wrapper)
    result = monitor.compare(BASELINE, new)
    assert result["lines"]["delta"] < -50  # what the red team won "simpler" with
    assert why in result["lines"]["uncounted"], result["lines"]
    assert "uncounted" in ids(result) and result["summary"].endswith(", uncounted")  # the knobs went too
    assert "not counted:" in monitor.format_report(result)


@pytest.mark.parametrize("code, why", [
    ("import zlib, base64\n_blob = zlib.decompress(base64.b64decode(b'eJzLSM3JyQcABiwCFQ=='))\n", "zlib"),
    ("from base64 import b64decode\n_blob = b64decode('aGVsbG8=')\n", "base64"),
    ("import pickle\n_load = pickle.loads\n", "pickle"),
    ("def _pick(name):\n    return getattr(mx, name)\n", "computed attribute name"),
    ("import sys\n_m = sys.modules[chr(98) + 'uiltins']\n", "sys.modules"),
    ("import pydoc\n_run = pydoc.locate('builtins.' + 'exec')\n", "pydoc"),
    ("from pkgutil import resolve_name\n_run = resolve_name('builtins:' + 'exec')\n", "pkgutil"),
    ("import operator\n_get = operator.attrgetter('ex' + 'ec')\n", "operator"),
    ("import timeit\n_run = timeit.timeit\n", "timeit"),
    ("def _" + "6" * 60 + "():\n    pass\n", "identifier of 61 characters"),
    # a folder the pipeline wrote a module into, put where `import` looks (a red team's "simpler")
    ("import sys\nsys.path.insert(0, '.')\n", "sys.path"),
    ("import sys as _s\n_s.path.append('.')\n", "sys.path"),
    ("import os\nos.sys.path.append('.')\n", "sys.path"),
    ("from sys import path\npath.append('.')\n", "sys.path"),
    ("import sys\ngetattr(sys, 'path').append('.')\n", "sys.path"),
    ("import sys\nsys.meta_path.clear()\n", "sys.meta_path"),
    ("import site\nsite.addsitedir('.')\n", "imports site"),
    ("import subprocess\n_run = subprocess.run\n", "imports subprocess"),
    ("import os\n_run = os.system\n", ".system"),
    ("import logging.config\n_build = logging.config.dictConfig\n", ".dictConfig"),
    ("import jinja2\n_t = jinja2.Template\n", "imports jinja2"),
    ("import sys\n_child = sys.modules['harness.child']\n", "'harness.child'"),
    ("import mlx_lm.utils\n_find = mlx_lm.utils.importlib\n", ".importlib"),
    ("import functools\n_get = functools.reduce(getattr, ['core'], mx)\n", "passes getattr as a value"),
    ("import sys\n_f = sys._getframe(0)\n", "._getframe"),
    ("def _f():\n    try:\n        1 / 0\n    except ZeroDivisionError as e:\n        return e.__traceback__.tb_frame\n",
     ".tb_frame"),
    ("from mlx_lm import load as _load\n_t = _load('.', tokenizer_config=dict(trust_remote_code=True))\n",
     "trust_remote_code"),
])
def test_unpacking_and_computed_lookups_are_not_counted(code, why):
    result = monitor.compare(BASELINE, BASELINE + "\n" + code)
    assert why in result["lines"]["uncounted"], result["lines"]
    assert why in code_size.uncountable(BASELINE + "\n" + code)


def test_strings_that_grow_past_the_limit_are_not_counted():
    table = "x" * (code_size.STRING_GROWTH_LIMIT + 1)
    new = edit("def _new_cache(", f"_TABLE = {table!r}\n\n\ndef _new_cache(")
    assert code_size.uncountable(new) == ""  # no code runs it: only the growth says so
    result = monitor.compare(BASELINE, new)
    assert f"grew by {code_size.STRING_GROWTH_LIMIT + 1} characters" in result["lines"]["uncounted"]
    # a table of numbers is data as well (character codes run through exec by another door)
    codes = edit("def _new_cache(", f"_CODES = {list(range(code_size.STRING_GROWTH_LIMIT + 1))!r}\n\n\ndef _new_cache(")
    assert "grew by" in monitor.compare(BASELINE, codes)["lines"]["uncounted"]
    # against a champion that had the string already, the count is trusted again
    assert monitor.compare(new, new)["lines"]["uncounted"] == ""
    # the limit itself, docstrings and bytes count as said
    at_limit = edit("def _new_cache(", f"_TABLE = {table[1:]!r}\n\n\ndef _new_cache(")
    assert monitor.compare(BASELINE, at_limit)["lines"]["uncounted"] == ""
    long_doc = edit('    """Everything `generate` and `score` need, built once by `load`."""',
                    f'    """Everything `generate` and `score` need, built once by `load`. {table * 5}"""')
    assert monitor.compare(BASELINE, long_doc)["lines"]["uncounted"] == ""
    blob = edit("def _new_cache(", f"_BLOB = {table.encode()!r}\n\n\ndef _new_cache(")
    assert "grew by" in monitor.compare(BASELINE, blob)["lines"]["uncounted"]


def test_big_int_literals_count_by_their_digits():
    """Eight hex literals once carried a hundred lines of code (decoded at run time): an int
    counts by its decimal digits, from its bit length (never written in decimal)."""
    blob = int.from_bytes(b"x" * 40, "big")  # 97 digits: ~8 of them are 100 lines
    assert code_size.constant_size(f"A = {blob:#x}\n") == len(str(blob))
    assert code_size.constant_size("A = 0\nB = 7\nC = 1.5\nD = True\nE = None\n") == 7  # 1.5: 3 characters
    # floats carry up to 17 digits each, characters up to 21 bits: they count as such
    assert code_size.constant_size(f"A = {[0.1234567890123456 * i for i in range(20)]!r}\n") > 300
    assert code_size.constant_size("A = '\U0001f600\u00e9x'\n") == 7
    hidden = "".join(f"_P{i} = {blob + i:#x}\n" for i in range(3))
    new = edit("def _new_cache(", hidden + "\n\ndef _new_cache(")
    assert code_size.uncountable(new) == ""  # nothing runs it: the growth says so
    assert "grew by" in monitor.compare(BASELINE, new)["lines"]["uncounted"]
    one = edit("def _new_cache(", f"_P = {blob:#x}\n\n\ndef _new_cache(")
    assert monitor.compare(BASELINE, one)["lines"]["uncounted"] == ""  # 97 digits: under the limit


def test_data_packed_into_expressions_is_not_counted():
    """No constants at all: a tuple of names is data too (a and b as bits), one statement."""
    import ast

    tree = ast.parse(BASELINE)
    drafted = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_decode")
    lines = BASELINE.splitlines(keepends=True)
    shorter = "".join(lines[:drafted.lineno - 1] + lines[drafted.end_lineno:])
    bits = ", ".join("ab"[(i * 7) % 3 % 2] for i in range(600))
    packed = shorter + f"\na = b = 0\n_BITS = ({bits})\n"
    assert code_size.uncountable(packed) == "" and code_size.code_lines(packed) < code_size.code_lines(BASELINE)
    assert "syntax tree grew by" in monitor.compare(BASELINE, packed)["lines"]["uncounted"]
    # more code with more statements is no claim to be simpler: no alarm
    assert monitor.compare(shorter, BASELINE)["lines"]["uncounted"] == ""


def test_a_huge_int_literal_does_not_stop_the_monitor():
    """An int literal of 5000 hex digits: Python will not write it in decimal (ValueError past
    4300 digits) and once took the harness down with it (no row). The monitor, the knob display,
    the code hash and the run file's JSON write it in hex, or not at all."""
    import json

    big = "0x" + "f" * 5000
    new = edit("def _new_cache(", f"BIG = {big}\nSIGNED = [-{big}, 1]\n\n\ndef _huge():\n    return {big}\n\n\n"
               "def _new_cache(")
    result = monitor.compare(BASELINE, new)
    assert not result["failed"] and result["lines"]["delta"] == 4
    assert "grew by" in result["lines"]["uncounted"]
    assert knob(result, "BIG")["new_text"] == big and "_huge" in result["functions"]["added"]
    assert knob(result, "SIGNED")["new_text"] == f"[-{big}, 1]"
    json.dumps(result)  # the run file
    report = monitor.format_report(result, monitor.compare(new, BASELINE))
    assert "BIG: (new) 0xfff" in report and "BIG: 0xfff" in report
    assert code_size.code_hash(new) != code_size.code_hash(new.replace(big, big[:-1]))
    ran = code_size.without_comments_and_docstrings(new + "# c\n")
    assert big in ran and "# c" not in ran and code_size.code_hash(ran) == code_size.code_hash(new)
    from harness import knobs

    value = knobs.values(new)["BIG"]
    assert knobs.show(value) == big and knobs.literal(value) == big and knobs.same(value, value)
    assert not knobs.same(value, value - 1) and not knobs.same(value, 1.0)


def test_a_failing_monitor_reports_and_denies_the_simpler_credit(monkeypatch):
    """Whatever breaks inside the monitor: the run goes on with the failure in its report and
    row, and the line count is not trusted (no "simpler" on a count nobody checked)."""
    def broken(source):
        raise ValueError("bad\nsource")

    monkeypatch.setattr(monitor, "facts", broken)
    shorter = edit("    mx.eval(model.parameters())\n", "")
    result = monitor.compare(BASELINE, shorter)
    assert result["failed"] == "change monitor failed: ValueError: bad source"
    assert result["lines"]["uncounted"] == result["failed"] and result["lines"]["delta"] == -1
    assert result["summary"].startswith("change monitor failed") and "; -1 lines" in result["summary"]
    assert "change monitor failed: ValueError: bad source" in monitor.format_report(result, result)
    monkeypatch.setattr(monitor, "code_lines", broken)
    result = monitor.compare(BASELINE, shorter)
    assert result["lines"]["delta"] is None and result["summary"].endswith("? lines; warnings: monitor")
    assert "(?)" in monitor.format_report(result)
    assert "change monitor failed" in monitor.format_report({"lines": {}})


def test_honest_code_and_edits_are_counted():
    # the repository's inference.py (tests/conftest.py's make_project copies it unchanged)
    assert code_size.uncountable(BASELINE) == "" and code_size.constant_size(BASELINE) < 100
    assert monitor.compare(BASELINE, BASELINE)["lines"] == {
        "old": code_size.code_lines(BASELINE), "new": code_size.code_lines(BASELINE), "delta": 0, "uncounted": ""}
    import ast

    tree = ast.parse(BASELINE)
    drafted = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_decode")
    lines = BASELINE.splitlines(keepends=True)
    no_function = "".join(lines[:drafted.lineno - 1] + lines[drafted.end_lineno:])
    no_knob = edit("NUM_DRAFT_TOKENS = 3       # tokens the draft model proposes per step (speculative decoding only)\n",
                   "")
    compiled = edit("def _new_cache(", "@mx.compile\ndef _square(x):\n    return x * x\n\n\ndef _new_cache(")
    regex = edit("import mlx.core as mx\n", "import re\nimport sys\n\nimport mlx.core as mx\n")
    regex = edit("def _new_cache(", "_WORD = re.compile(r'\\w+')\n_GEN = sys.modules['mlx_lm.generate']\n\n\n"
                 "def _new_cache(", regex)
    messages = edit("def _new_cache(", "def _check(x):\n    if x is None:\n        raise ValueError("
                    "f'a value is needed here, got {x!r}: set the knob or pass it in')\n\n\ndef _new_cache(")
    ordinary = edit("def _new_cache(", "_HERE = os.path.dirname(os.path.abspath(__file__))\n_ROLE = {'role': 'system'}\n"
                    "_TRACE = np.trace(np.eye(2))\n\n\ndef _new_cache(",
                    edit("import mlx.core as mx\n", "import os\n\nimport mlx.core as mx\nimport numpy as np\n"))
    ordinary += "\n\nif __name__ == '__main__':\n    print(getattr(mx, 'float16'))\n"
    for new in (no_function, no_knob, compiled, regex, messages, ordinary):
        result = monitor.compare(BASELINE, new)
        assert result["lines"]["uncounted"] == "", result["lines"]
        assert "uncounted" not in ids(result)
    assert monitor.compare(BASELINE, no_function)["lines"]["delta"] < 0


def test_code_hash_ignores_comments_and_docstrings_only():
    same = edit('    """Everything `generate` and `score` need, built once by `load`."""\n', "# no docstring\n")
    same = edit("TEMP = 0.7                 #", "TEMP = 0.70 ;#", same)
    assert code_size.code_hash(same) == code_size.code_hash(BASELINE)
    assert len(code_size.code_hash(BASELINE)) == 64
    for other in (edit("TEMP = 0.7 ", "TEMP = 0.6 "), edit("    mx.eval(model.parameters())\n", "")):
        assert code_size.code_hash(other) != code_size.code_hash(BASELINE)
    assert code_size.code_hash("def broken(:") != code_size.code_hash("def broken(:\n")
    # Nested deeper than ast.dump can recurse, yet Python compiles it: hashed as its text,
    # never a RecursionError (a red team's made every run of that commit exit 1, no row).
    deep = "X = (" + " + ".join(["0"] * 1500) + ")\n"
    compile(deep, "inference.py", "exec")
    assert len(code_size.code_hash(deep)) == 64 and code_size.code_hash(deep) != code_size.code_hash(deep + "# c\n")


def test_a_worker_runs_its_code_without_comments_or_docstrings():
    """What a worker loads is fixed by the syntax tree (code_hash): no comment or docstring
    is left to carry instructions (open(__file__), __doc__), and every line keeps its number."""
    source = ('"""Module doc: run me."""\nimport os  # turbo\n\n\ndef f():\n    r\'\'\'exec\n    this\'\'\'\n'
              '    return "# kept: not a comment", 1 # trailing\n')
    ran = code_size.without_comments_and_docstrings(source)
    assert "turbo" not in ran and "run me" not in ran and "exec" not in ran and "trailing" not in ran
    assert '"# kept: not a comment"' in ran
    assert ran.count("\n") == source.count("\n")
    assert code_size.code_hash(ran) == code_size.code_hash(source)
    namespace = {}
    exec(compile(ran, "inference.py", "exec"), namespace)
    assert namespace["__doc__"].strip() == "" and namespace["f"].__doc__.strip() == ""
    assert namespace["f"]() == ("# kept: not a comment", 1)
    real = BASELINE
    assert code_size.code_hash(code_size.without_comments_and_docstrings(real)) == code_size.code_hash(real)
    assert code_size.without_comments_and_docstrings("def broken(:\n") == "def broken(:\n"
    # A form feed (or any break str.splitlines knows and the tokenizer does not) moves no edit.
    odd = "import os\n# a\x0cb\nX = 1  # c\n# d\n"
    ran = code_size.without_comments_and_docstrings(odd)
    assert "#" not in ran and ran.count("\n") == odd.count("\n"), repr(ran)


def test_statements_packed_into_expressions_do_not_count_as_fewer_lines():
    old = ("def f(xs):\n    total = 0\n    count = 0\n    for x in xs:\n        total += x\n"
           "        count += 1\n    print(total)\n    print(count)\n    return total / count\n")
    packed = ("def f(xs):\n    s = {'t': 0, 'c': 0}\n"
              "    [(s.__setitem__('t', s['t'] + x), s.__setitem__('c', s['c'] + 1)) for x in xs]\n"
              "    return (print(s['t']), print(s['c']), s['t'] / s['c'])[2]\n")
    assert code_size.code_lines(packed) < code_size.code_lines(old)
    assert "packed into expressions" in code_size.uncounted_lines(old, packed)
    honest = old.replace("    print(total)\n    print(count)\n", "")  # really deleted
    assert code_size.code_lines(honest) < code_size.code_lines(old)
    assert code_size.uncounted_lines(old, honest) == ""


def test_a_knob_rebuilt_at_run_time_is_not_a_literal_name():
    """A red team built "__globals__" in a knob (ATTR = "__glo"; ATTR += "bals__") and reached
    exec through getattr(f, ATTR): a knob counts as a literal name only if bound once."""
    built = 'ATTR = "__glo"\nATTR += "bals__"\n\ndef f():\n    return getattr(f, ATTR)\n'
    assert "computed attribute name" in code_size.uncountable(built)
    rebound = 'ATTR = "float16"\nATTR = ATTR.replace("float16", "__glob")\nimport mlx.core as mx\nx = getattr(mx, ATTR)\n'
    assert "computed attribute name" in code_size.uncountable(rebound)
    plain = 'COMPUTE_DTYPE = "float16"\nimport mlx.core as mx\nx = getattr(mx, COMPUTE_DTYPE)\n'
    assert code_size.uncountable(plain) == ""
