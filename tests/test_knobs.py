"""The knobs of inference.py: reading, comparing, showing and patching them."""

from pathlib import Path

import pytest

from harness import knobs

REPO = Path(__file__).resolve().parent.parent
BASELINE = (REPO / "inference.py").read_text()


def test_values_of_the_real_inference_py():
    found = knobs.values(BASELINE)
    assert found["TEMP"] == 0.7 and found["KV_BITS"] is None and found["COMPUTE_DTYPE"] == "float32"
    assert "Pipeline" not in found
    for name in ("TEMP", "TOP_P", "TOP_K", "MIN_P", "KV_BITS", "QUANTIZED_KV_START", "MAX_KV_SIZE",
                 "PREFILL_STEP_SIZE", "COMPUTE_DTYPE", "CACHE_LIMIT_GB", "NUM_DRAFT_TOKENS"):
        assert name in knobs.settable(BASELINE), name


def test_values_literals_expressions_tuples_and_annotations():
    source = "A = 1\nB = mx.float16\nlower = 3\nC, D = 2, 'x'\nE: int = 5\n_F = 6\nA = 7\n"
    found = knobs.values(source)
    assert found == {"A": 7, "B": "mx.float16", "C": 2, "D": "x", "E": 5}  # the later A wins
    assert isinstance(found["B"], knobs.Expr) and not isinstance(found["D"], knobs.Expr)
    assert set(knobs.settable(source)) == {"A", "C", "D", "E"}  # an expression cannot be set


def test_a_value_over_several_lines_is_read_but_not_settable():
    source = "SIZES = (\n    1,\n    2,\n)\nN = 3\n"
    read = knobs.read(source)
    assert read["SIZES"].value == (1, 2) and not read["SIZES"].settable
    assert (read["N"].line, read["N"].start, read["N"].end) == (5, 4, 5)
    with pytest.raises(knobs.KnobError):
        knobs.patched_source(source, {"SIZES": (3,)})


def test_a_source_that_does_not_parse_raises_syntax_error():
    with pytest.raises(SyntaxError):
        knobs.read("A = (\n")


@pytest.mark.parametrize("a, b, expected", [
    (1, 1.0, True), (0, 0.0, True), (64, 64, True), ("x", "x", True), (None, None, True),
    ((1, 2.0), (1.0, 2), True), ({"a": 1}, {"a": 1.0}, True),
    (True, 1, False), (False, 0, False), (None, 0, False), ("4", 4, False), ((1,), [1], False),
    ((1, True), (1, 1), False), (knobs.Expr("x"), "x", False), (0.7, 0.5, False),
])
def test_same_compares_numbers_as_numbers_and_nothing_else_across_types(a, b, expected):
    assert knobs.same(a, b) is expected and knobs.same(b, a) is expected


def test_show_and_literal():
    assert knobs.show(knobs.Expr("mx.float16")) == "mx.float16" and knobs.show("a\tb") == "'a\\tb'"
    assert knobs.show(knobs.Expr("f(\n  1)")) == "f( 1)"  # one line
    assert knobs.literal("bfloat16") == '"bfloat16"' and knobs.literal(None) == "None"


def test_patch_keeps_comment_columns_and_skips_same_values():
    new = knobs.patched_source(BASELINE, {"COMPUTE_DTYPE": "bfloat16", "KV_BITS": 8, "TEMP": 0.0,
                                          "MAX_KV_SIZE": None, "KV_GROUP_SIZE": 64.0})
    old_lines, new_lines = BASELINE.splitlines(), new.splitlines()
    changed = [(a, b) for a, b in zip(old_lines, new_lines) if a != b]
    assert len(old_lines) == len(new_lines) and len(changed) == 3  # None and 64.0 are no change
    for old, line in changed:
        assert line.split("#")[1] == old.split("#")[1]  # the comment is intact
    assert 'COMPUTE_DTYPE = "bfloat16"  # dtype' in new and "KV_BITS = 8                #" in new
    assert "TEMP = 0.0                 # sampling" in new  # same width: comment column kept
    assert knobs.make_patch(BASELINE, {"TEMP": 0.7}) == ""  # no change, no patch
    with pytest.raises(knobs.KnobError):
        knobs.make_patch(BASELINE, {"NOT_A_KNOB": 1})


def test_patch_two_knobs_on_one_line_and_unicode_before_them():
    source = "A, B = 1, 2  # é\nS = 'é'; T = 3\n"
    new = knobs.patched_source(source, {"A": 100, "B": "xy", "T": 4})
    assert new == "A, B = 100, \"xy\"  # é\nS = 'é'; T = 4\n"
    assert knobs.values(new) == {"A": 100, "B": "xy", "S": "é", "T": 4}
    diff = knobs.make_patch(source, {"T": 4})
    assert diff.startswith("--- a/inference.py\n+++ b/inference.py\n") and "+S = 'é'; T = 4" in diff


def test_huge_ints_are_shown_in_hex_and_compared_exactly():
    """Python will not write an int of over 4300 digits in decimal (a ValueError once took the
    harness down): past knobs.BIG_INT_BITS the knobs are shown, written and dumped in hex."""
    import ast

    big = "0x" + "f" * 5000
    source = f"A = {big}\nB = ({big}, -{big}, 'x')\nC = {{1: [{big}]}}\nD = {{{big}}}\nE = 12\n"
    found = knobs.values(source)
    assert knobs.show(found["A"]) == big and knobs.literal(found["A"]) == big
    assert knobs.show(found["B"]) == f"({big}, -{big}, 'x')" and knobs.show(found["C"]) == f"{{1: [{big}]}}"
    assert knobs.show(found["D"]) == f"{{{big}}}" and knobs.show((found["A"],)) == f"({big},)"
    assert knobs.show(found["E"]) == "12" and not knobs.has_big_int(found["E"])
    assert knobs.same(found["A"], int(big, 16)) and not knobs.same(found["A"], found["A"] - 1)
    assert not knobs.same(found["A"], 1e308) and knobs.same(2 ** 60, float(2 ** 60))
    tree = knobs.parse(source)
    assert ast.unparse(tree).startswith(f"A = {big}\n") and "Constant(value=0xfff" in ast.dump(tree)
    patched = knobs.patched_source(source, {"E": int(big, 16)})
    assert patched.endswith(f"E = {big}\n")
