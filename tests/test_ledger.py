"""harness.ledger: results.tsv written as csv, read back exactly, old unquoted files included."""

import csv
import json

import pandas
import pytest

from harness import ledger
from harness.ledger import Decision

# Subjects that a plain tab split, or a careless csv reader, would get wrong.
AWKWARD_SUBJECTS = [
    '"quoted" start\tand a tab',
    'say ""hi"" to the cache"',
    '"',
    '\t',
    "plain words",
]


def _row(subject, decision="KEEP", **extra):
    return dict({"timestamp": "2026-01-01T00:00:00+00:00", "commit": "abc1234", "branch": "main",
                 "subject": subject, "decision": decision, "reason": "because", "decode_tps": 101.5,
                 "dirty": False}, **extra)


def _write_awkward(path):
    for subject in AWKWARD_SUBJECTS:
        ledger.append(path, _row(subject))


def test_awkward_subjects_round_trip_through_read(tmp_path):
    path = tmp_path / "results.tsv"
    _write_awkward(path)
    rows, problems = ledger.read(path)
    assert problems == []
    assert [r["subject"] for r in rows] == AWKWARD_SUBJECTS
    assert [r["line"] for r in rows] == list(range(2, 2 + len(AWKWARD_SUBJECTS)))
    assert rows[0]["decode_tps"] == "101.5" and rows[0]["dirty"] == "false" and rows[0]["config"] == ""
    # one physical line per row
    assert len(path.read_text().splitlines()) == 1 + len(AWKWARD_SUBJECTS)


def test_control_characters_are_written_as_escapes(tmp_path):
    """A pipeline's error message (a CRASH reason) or a commit subject cannot move the cursor of
    the terminal that shows results.tsv or `log` (a red team drew a fake KEEP row over its CRASH)."""
    path = tmp_path / "results.tsv"
    reason = "load() raised E: \x1b[2K\x1b[1G*  c0ffee1  fused  KEEP  +31.0 %\u202e\x07"
    ledger.append(path, _row("subject \x1b[31mred\x1b[0m", decision="CRASH", reason=reason))
    text = path.read_text()
    assert not any(ord(c) < 32 and c not in "\t\n" or c in "\x7f\u202e" for c in text), repr(text)
    rows, problems = ledger.read(path)
    assert problems == [] and rows[0]["reason"].startswith("load() raised E: \\x1b[2K\\x1b[1G*  c0ffee1")
    assert rows[0]["reason"].endswith("\\u202e\\x07") and rows[0]["subject"] == "subject \\x1b[31mred\\x1b[0m"


def test_the_run_s_own_output_escapes_control_characters_too(capsys):
    """The key: value block on stdout and the notes on stderr print a CRASH reason or a
    worker's log as visible escapes, as results.tsv does."""
    from harness import report

    reason = "load() raised E: \x1b[2K\x1b[1G*  KEEP  +31.0 %\u202e\x07"
    text = report.block({"decision": "CRASH", "reason": reason + "\nsecond line"})
    line = next(x for x in text.splitlines() if x.startswith("reason: "))
    assert line == "reason: load() raised E: \\x1b[2K\\x1b[1G*  KEEP  +31.0 %\\u202e\\x07 second line"
    report.note("last lines of the worker's output:\n\x1b[31mred\x1b[0m\tok")
    err = capsys.readouterr().err
    assert err == "last lines of the worker's output:\n\\x1b[31mred\\x1b[0m\tok\n"


def test_awkward_subjects_round_trip_through_csv_dictreader(tmp_path):
    path = tmp_path / "results.tsv"
    _write_awkward(path)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert [r["subject"] for r in rows] == AWKWARD_SUBJECTS
    assert all(list(r) == ledger.COLUMNS for r in rows)
    # the form the brief names, without newline="", reads the same
    with open(path) as f:
        assert [r["subject"] for r in csv.DictReader(f, delimiter="\t")] == AWKWARD_SUBJECTS


def test_awkward_subjects_round_trip_through_pandas(tmp_path):
    path = tmp_path / "results.tsv"
    _write_awkward(path)
    frame = pandas.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    assert list(frame.columns) == ledger.COLUMNS
    assert list(frame["subject"]) == AWKWARD_SUBJECTS
    assert list(frame["decision"]) == ["KEEP"] * len(AWKWARD_SUBJECTS)


def test_newlines_become_spaces_tabs_stay():
    line = ledger.format_row(_row("two\nlines\r\nand\ta tab"))
    assert line.endswith("\n") and line.count("\n") == 1 and "\r" not in line
    assert ledger.parse_line(line[:-1])[ledger.COLUMNS.index("subject")] == "two lines  and\ta tab"


def test_legacy_unquoted_file_reads_exactly(tmp_path):
    """A file from before quoting: cells split on tabs, quotes written as they were."""
    subjects = ['"quoted" start', 'say "hi"', '"a"', '""', 'ends with a quote"', "plain"]
    path = tmp_path / "results.tsv"
    lines = [ledger.HEADER]
    for subject in subjects:
        cells = {c: "" for c in ledger.COLUMNS}
        cells.update(commit="abc1234", branch="main", subject=subject, decision="REVERT",
                     reason='"slower": 0.9x', changes='+1 line "x"')
        lines.append("\t".join(cells[c] for c in ledger.COLUMNS) + "\n")
    path.write_text("".join(lines))
    rows, problems = ledger.read(path)
    assert problems == []
    assert [r["subject"] for r in rows] == subjects
    assert all(r["reason"] == '"slower": 0.9x' and r["changes"] == '+1 line "x"' for r in rows)

    # the harness goes on appending quoted rows to the old file; both kinds read back
    ledger.append(path, _row('"new" row\twith a tab'))
    rows, problems = ledger.read(path)
    assert problems == [] and [r["subject"] for r in rows] == subjects + ['"new" row\twith a tab']


def test_missing_final_newline_never_glues_rows(tmp_path):
    path = tmp_path / "results.tsv"
    ledger.append(path, _row("first"))
    path.write_text(path.read_text().rstrip("\n"))  # a hand edit lost the last newline
    ledger.append(path, _row("second"))
    rows, problems = ledger.read(path)
    assert problems == [] and [r["subject"] for r in rows] == ["first", "second"]


def test_damaged_line_is_reported_by_number_and_skipped(tmp_path):
    path = tmp_path / "results.tsv"
    ledger.append(path, _row("first"))
    with open(path, "a") as f:
        f.write('"an unclosed quote\tand\tthree\n')  # line 3; must not swallow line 4
    ledger.append(path, _row("after"))
    rows, problems = ledger.read(path)
    assert [r["subject"] for r in rows] == ["first", "after"] and rows[1]["line"] == 4
    assert len(problems) == 1 and "results.tsv line 3 has 3 fields" in problems[0]


def test_other_header_is_refused(tmp_path):
    path = tmp_path / "results.tsv"
    path.write_text("timestamp\tcommit\n")
    with pytest.raises(ledger.LedgerError, match="different header"):
        ledger.append(path, _row("x"))
    rows, problems = ledger.read(path)
    assert rows == [] and "line 1" in problems[0]
    with pytest.raises(ValueError, match="unknown results.tsv columns"):
        ledger.format_row({"nope": 1})


def test_decision_vocabulary_is_plain_text(tmp_path):
    assert Decision.KEEP == "KEEP" and f"{Decision.CRASH}" == "CRASH"
    assert ledger.CHAMPION_DECISIONS == {"BASELINE", "KEEP"}
    assert ledger.FAILED == {"CRASH", "INVALID", "REJECT"}
    assert ledger.RESETTABLE == {"REVERT", "CRASH", "INVALID", "REJECT"}
    path = tmp_path / "results.tsv"
    ledger.append(path, _row("x", decision=Decision.REVERT))
    rows, _ = ledger.read(path)
    assert type(rows[0]["decision"]) is str and rows[0]["decision"] in ledger.RESETTABLE


def test_branch_baseline():
    rows = [dict(commit="a", branch="main", decision="BASELINE", line=2),
            dict(commit="b", branch="side", decision="BASELINE", line=3),
            dict(commit="c", branch="main", decision="KEEP", line=4),
            dict(commit="d", branch="main", decision="BASELINE", line=5)]
    assert ledger.branch_baseline(rows, ["c", "a"], "main")["line"] == 2
    assert ledger.branch_baseline(rows, ["d", "c", "a"], "main")["line"] == 5
    assert ledger.branch_baseline(rows, ["b", "a"], "side")["line"] == 3
    assert ledger.branch_baseline(rows, ["c"], "main") is None
    assert ledger.branch_baseline([], ["a"], "main") is None


def test_earlier_ratios_pool_only_the_same_code_against_the_same_champion(tmp_path):
    """A re-roll continues its comparison: the newest clean row of the same code hash,
    champion and protocol holds every pair so far; other code, champions, protocols,
    failed, gate-failing, dirty, search or foreign rows never count."""
    path = tmp_path / "results.tsv"
    same = dict(code_hash="h1", champion="c0", protocol="p", decision="REVERT", quality_pass=True)

    def pairs(*values):
        return json.dumps({"decode_tps": list(values), "end_to_end": list(values)})

    ledger.append(path, _row("first try", **same, ratios=pairs(1.1, 1.2)))
    ledger.append(path, _row("re-roll", **same, ratios=pairs(1.1, 1.2, 1.3)))
    for other in (dict(code_hash="h2"), dict(champion="c9"), dict(protocol="q"), dict(decision="CRASH"),
                  dict(dirty=True), dict(source="search"), dict(quality_pass=False)):
        ledger.append(path, _row("not the same comparison", **{**same, **other}, ratios=pairs(9.0)))
    rows, _ = ledger.read(path)
    pooled, runs = ledger.earlier_ratios(rows, protocol="p", champion="c0", code_hash="h1")
    assert pooled == {"decode_tps": [1.1, 1.2, 1.3], "end_to_end": [1.1, 1.2, 1.3]} and runs == 2
    assert ledger.earlier_ratios(rows, protocol="p", champion="c0", code_hash="h3") == ({}, 0)
    # a row the harness did not write is never pooled
    with open(path, "a") as f:
        f.write(ledger.format_row(_row("forged", **same, ratios=pairs(5.0, 5.0))))
    rows, _ = ledger.read(path)
    assert ledger.earlier_ratios(rows, protocol="p", champion="c0", code_hash="h1")[0]["decode_tps"] == [1.1, 1.2, 1.3]


def test_usual_spread_is_the_median_of_recent_comparisons(tmp_path):
    path = tmp_path / "results.tsv"
    for spread in (0.05, 0.07, 0.06):
        ledger.append(path, _row("run", protocol="p", pair_spread=spread))
    ledger.append(path, _row("other protocol", protocol="q", pair_spread=5.0))
    ledger.append(path, _row("alone", protocol="p"))  # no spread: a run without a champion
    rows, _ = ledger.read(path)
    assert ledger.usual_spread(rows, protocol="p") == pytest.approx(0.06)
    assert ledger.usual_spread(rows, protocol="q") is None  # fewer than 3


def test_own_speed_is_the_median_of_the_commits_clean_runs(tmp_path):
    path = tmp_path / "results.tsv"
    same = dict(commit="c0", protocol="p", quality_pass=True)
    for tps in (10.0, 12.0, 11.0):
        ledger.append(path, _row("run", **same, decode_tps=tps))
    for other in (dict(commit="c9"), dict(protocol="q"), dict(decision="CRASH"), dict(dirty=True),
                  dict(source="search"), dict(quality_pass=False)):
        ledger.append(path, _row("not the champion's own clean run", **{**same, **other}, decode_tps=1.0))
    rows, _ = ledger.read(path)
    assert ledger.own_speed(rows, protocol="p", commit="c0", metric="decode_tps") == pytest.approx(11.0)
    assert ledger.own_speed(rows, protocol="p", commit="c1", metric="decode_tps") is None


def test_a_keep_against_a_champion_far_below_its_own_pace_is_invalid(tmp_path):
    from types import SimpleNamespace

    from harness import pace

    path = tmp_path / "results.tsv"
    ledger.append(path, _row("champion kept", commit="c0", protocol="p", quality_pass=True, decode_tps=10.0))
    rows, _ = ledger.read(path)
    ctx = SimpleNamespace(protocol="p", settings=SimpleNamespace(verdict=SimpleNamespace(primary_metric="decode_tps")))
    standing = SimpleNamespace(rows=rows)
    for decision, now, expected in (("KEEP", 5.0, "INVALID"), ("KEEP", 8.0, "KEEP"), ("REVERT", 5.0, "REVERT")):
        result = {"decision": ledger.Decision(decision), "reason": "faster", "champion": "c0", "champion_speed": now}
        pace.check_champion_pace(ctx, result, standing)
        assert result["decision"] == expected and result["champion_pace"] == pytest.approx(now / 10.0)
        if expected == "INVALID":
            assert "50 % below its own 10.0" in result["reason"] and "was: KEEP" in result["reason"]
    # where the pace against the yardstick record was taken, that check (immune to load) decides
    result = {"decision": ledger.Decision.KEEP, "reason": "faster", "champion": "c0", "champion_speed": 5.0,
              "champion_yardstick_pace": 0.99}
    pace.check_champion_pace(ctx, result, standing)
    assert result["decision"] == "KEEP" and result["champion_pace"] == pytest.approx(0.5)


def test_a_keep_against_a_champion_slower_against_the_yardstick_than_its_record_is_invalid(tmp_path):
    """The champion's speed over the yardstick's, now against its record (the best clean run
    of its code): a champion that slows down once it is the champion is caught whatever the
    machine's load (the ratio cancels it); a win it cannot explain stands, and records at
    least the speed it implies."""
    import math
    from types import SimpleNamespace

    from harness import pace, verdict
    from harness.bench import Sample

    path = tmp_path / "results.tsv"
    ledger.append(path, _row("kept as challenger", commit="c0", protocol="p", quality_pass=True, code_hash="h0",
                             yardstick_ratio=2.0, yardstick_se=0.004))
    ledger.append(path, _row("its code sandbagged on another branch", commit="c0", protocol="p", quality_pass=True,
                             code_hash="h0", decision="BASELINE", yardstick_ratio=1.0, yardstick_se=0.004))
    ledger.append(path, _row("another code", commit="c2", protocol="p", quality_pass=True, code_hash="h2",
                             yardstick_ratio=9.0, yardstick_se=0.004))
    ledger.append(path, _row("an older harness's row", commit="c1", protocol="p", quality_pass=True))
    ledger.append(path, _row("slowed code, baselined on a new branch from c2", commit="c3", protocol="p",
                             quality_pass=True, code_hash="h3", decision="BASELINE", yardstick_ratio=1.0,
                             yardstick_se=0.004))
    rows, _ = ledger.read(path)
    record = ledger.yardstick_record(rows, rows[1], ["c0"])  # the sandbagged BASELINE is the champion row
    assert record == (pytest.approx(math.log(2.0)), pytest.approx(0.004))  # the best run of its code
    assert ledger.yardstick_record(rows, rows[3], ["c1"]) == (None, None)
    # a first BASELINE of new code is held to the record of the commits it descends from
    assert ledger.yardstick_record(rows, rows[4], ["c3", "c2", "c0"])[0] == pytest.approx(math.log(9.0))
    assert ledger.yardstick_record(rows, rows[4], ["c3", "c0", "c1"])[0] == pytest.approx(math.log(2.0))  # not c2's
    assert ledger.yardstick_record(rows, rows[1], ["c0"])[0] == pytest.approx(math.log(2.0))  # not its descendants'
    # not descended from the protocol's first clean run (c0), e.g. an orphan branch: the best clean run of the protocol
    assert ledger.yardstick_record(rows, rows[4], ["c3"])[0] == pytest.approx(math.log(9.0))
    assert ledger.yardstick_record(rows, rows[4], ["c3", "c2"])[0] == pytest.approx(math.log(9.0))
    ctx = SimpleNamespace(protocol="p", settings=SimpleNamespace(verdict=SimpleNamespace(primary_metric="decode_tps",
                                                                                          min_effect=0.01)))

    def run(champion_over_stick, load, calls=12, pad=0.0):
        """Samples of one run: the machine `load` times slower for everyone; the champion's
        first token `pad` seconds late (its decode_tps unchanged)."""
        def sample(worker, r, tps, pad=0.0):
            return Sample(worker=worker, prompt="a", kind="decode", repeat=r, nonce="x", prompt_tokens=10, n_tokens=9,
                          ttft_s=0.001 + pad, total_s=8 / tps + pad, decode_s=8 / tps, decode_tps=tps,
                          prefill_tps=100.0, peak_memory_bytes=1, prompt_ids=[], tokens=[])
        stick = [sample("yardstick", r, 50 / load * (1 + 0.01 * (-1) ** r)) for r in range(calls)]
        return stick + [sample("champion", r, 50 * champion_over_stick / load, pad) for r in range(calls)]

    for over, load, low, whole_low, expected in (
            (2.0, 1.5, 1.2, 1.05, "KEEP"),     # as it was, on a busier machine
            (1.96, 1.0, 1.05, 1.04, "KEEP"),   # 2 % slower: +4 % is still a win
            (1.4, 1.0, 1.2, 1.08, "INVALID"),  # 30 % slower
            (1.4, 1.0, 2.0, 1.1, "INVALID"),   # whole calls (capped at x1.1) cannot outrun that
            (1.8, 1.0, 1.3, 1.1, "KEEP"),      # 10 % slower: a win of x1.1 on whole calls still clears
            (2.0, 1.0, 0.995, 0.995, "KEEP"),  # a simpler KEEP (no slower than -1 %), champion as it was
            (1.4, 1.0, None, None, "REVERT")):
        result = {"decision": ledger.Decision("KEEP" if low else "REVERT"), "reason": "faster",
                  "champion": "c0", "speedup_ci": [low, 3.0], "end_to_end_ci": [whole_low, 1.1],
                  "yardstick_ratio": 1.0}
        pace.check_champion_yardstick(ctx, result, {"samples": run(over, load)}, record)
        assert result["decision"] == expected, (over, load, result)
        assert result["champion_yardstick_pace"] == pytest.approx(over / 2.0, rel=0.01)
        if expected == "INVALID":
            assert "ran -30.0 % against its record" in result["reason"] and "was: KEEP" in result["reason"]
        if expected == "KEEP" and low > 1.01:  # a win records at least the record times the discounted lower end
            assert result["yardstick_ratio"] >= 2.0 * whole_low * min(1.0, over / 2.0) * 0.98
    # a champion that pauses before its first token is as fast as ever between first and last
    # token, but not over whole calls: bursting the challenger's tokens buys nothing against it
    padded = run(2.0, 1.0, pad=8 / 100 * 0.4)
    assert verdict.yardstick_ratio(padded, "champion", "decode_tps")[0] == pytest.approx(math.log(2.0), abs=0.01)
    result = {"decision": ledger.Decision.KEEP, "reason": "faster", "champion": "c0", "speedup_ci": [1.3, 1.5],
              "end_to_end_ci": [1.05, 1.1]}
    pace.check_champion_yardstick(ctx, result, {"samples": padded}, record)
    assert result["decision"] == "INVALID" and result["champion_yardstick_pace"] == pytest.approx(1 / 1.4, rel=0.01)
    # four yardstick calls bound nothing: no KEEP on them
    result = {"decision": ledger.Decision.KEEP, "reason": "faster", "champion": "c0", "speedup_ci": [1.3, 1.5],
              "end_to_end_ci": [1.1, 1.1]}
    pace.check_champion_yardstick(ctx, result, {"samples": run(1.4, 1.0, calls=4)}, record)
    assert result["decision"] == "INVALID" and "too few yardstick calls" in result["reason"]
    # no record (an older harness's row): nothing checked here
    result = {"decision": ledger.Decision.KEEP, "reason": "faster", "champion": "c1", "speedup_ci": [1.2, 3.0]}
    pace.check_champion_yardstick(ctx, result, {"samples": run(1.0, 1.0)}, (None, None))
    assert result["decision"] == "KEEP" and "champion_yardstick_pace" not in result


def test_earlier_runs_against_a_champion_slower_than_its_record_are_not_pooled(tmp_path):
    path = tmp_path / "results.tsv"
    same = dict(protocol="p", champion="c0", code_hash="h", quality_pass=True, decision="REVERT")
    ledger.append(path, _row("fine", **same, ratios='{"decode_tps": [1.1]}', champion_yardstick_pace=1.0))
    ledger.append(path, _row("slow champion", **same, ratios='{"decode_tps": [1.1, 1.3]}', champion_yardstick_pace=0.8))
    rows, _ = ledger.read(path)
    assert ledger.earlier_ratios(rows, protocol="p", champion="c0", code_hash="h") == ({}, 0)
    assert ledger.earlier_ratios(rows[:1], protocol="p", champion="c0", code_hash="h") == ({"decode_tps": [1.1]}, 1)
