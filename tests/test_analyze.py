"""`prepare.py analyze`: the frontier is exactly the non-dominated supported points, failures,
unscored rows, REVERTs and unconfirmed search trials are never recommended, the best
configuration per quality target, the plot and report."""

import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

from conftest import git

from harness import analyze, ledger, plots

REPO = Path(__file__).resolve().parent.parent


def test_pareto_frontier_is_the_non_dominated_set():
    pairs = [(100, 1.0), (120, 0.99), (110, 0.97), (130, 0.96), (125, 0.95), (90, 0.90), (140, 0.92),
             (140, 0.92), (139, 0.92)]
    frontier = analyze.pareto_frontier(pairs)
    assert sorted(pairs[i] for i in frontier) == [(100, 1.0), (120, 0.99), (130, 0.96), (140, 0.92),
                                                  (140, 0.92)]
    for i, (s, q) in enumerate(pairs):  # brute force: on the frontier iff nothing dominates it
        beaten = any(s2 >= s and q2 >= q and (s2, q2) != (s, q) for s2, q2 in pairs)
        assert (i in frontier) == (not beaten)
    assert analyze.pareto_frontier([]) == []


# (source, decision, decode_tps, quality_score, quality_pass, config/subject)
ROWS = [
    ("agent", "BASELINE", 100.0, 1.000, "true", "baseline"),             # frontier
    ("agent", "KEEP", 120.0, 0.990, "true", "fuse the MLP"),              # frontier
    ("agent", "REVERT", 110.0, 0.970, "true", "bigger prefill step"),     # a REVERT: never recommended
    ("agent", "REVERT", 200.0, 0.700, "false", "4-bit everything"),       # fastest, but gates failed
    ("agent", "CRASH", None, None, "", "typo"),                           # excluded
    ("search", "MEASURED", 130.0, 0.960, "true", {"KV_BITS": 8}),         # candidate
    ("search", "MEASURED", 125.0, 0.950, "true", {"KV_BITS": 8, "TOP_K": 20}),  # lower speed AND quality
    ("search", "MEASURED", 90.0, 0.900, "true", {"COMPUTE_DTYPE": "float16"}),  # dominated
    ("search", "MEASURED", 140.0, 0.920, "true", {"KV_BITS": 4}),         # candidate (fastest good)
    ("search", "CRASH", 150.0, None, "", {"COMPUTE_DTYPE": "bad"}),       # excluded, even with a speed
    ("search", "MEASURED", 300.0, None, "", {"TEMP": 0.0}),               # unscored: never on it
]
# Not in a git repository, so no search trial can be confirmed: only the champions are supported.
FRONTIER_LINES = {3, 2}  # file lines (header is line 1) of 120 (KEEP), 100 (BASELINE)
CANDIDATE_LINES = {10, 7}  # the unconfirmed search trials' frontier: 140, 130


def _write_ledger(path):
    for i, (source, decision, tps, quality, passed, what) in enumerate(ROWS):
        config = what if isinstance(what, dict) else None
        ledger.append(path, {
            "timestamp": f"2026-01-0{1 + i // 4}T1{i % 10}:00:00+00:00", "commit": f"c{i:06d}",
            "branch": "main", "subject": what if isinstance(what, str) else "baseline", "source": source,
            "protocol": "proto1", "model": "tiny", "preset": "quick", "decision": decision,
            "reason": "test row", "decode_tps": tps, "quality_score": quality, "quality_pass": passed,
            "quality_adjusted_tps": tps * quality if tps and quality else None,
            "config": json.dumps(config) if config else None,
            "speedup": 1.25 if decision == "KEEP" else None})
    # line numbers: header is line 1, ROWS[i] is line i + 2
    assert FRONTIER_LINES == {i + 2 for i in (1, 0)} and CANDIDATE_LINES == {i + 2 for i in (8, 5)}


def _run(*args, cwd):
    return subprocess.run([sys.executable, str(REPO / "prepare.py"), "analyze", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)


def test_analyze_frontier_targets_plot_and_report(tmp_path):
    path = tmp_path / "results.tsv"
    _write_ledger(path)
    out = tmp_path / "out"
    proc = _run("results.tsv", "--target-quality", "0.995", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    block = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
    assert block["frontier"] == "2"
    frontier = {int(block[f"frontier_{i}"].rsplit(":", 1)[1]) for i in range(2)}
    assert frontier == FRONTIER_LINES
    assert block["frontier_0"].startswith("decode_tps=120 quality=0.99 source=agent")
    assert block["candidates"] == "2"
    assert {int(block[f"candidate_{i}"].rsplit(":", 1)[1]) for i in range(2)} == CANDIDATE_LINES
    assert block["supported"] == "2 (champions 2, confirmed trials 0; superseded 0; reverted 2, never recommended)"
    assert block["excluded"] == "2 (CRASH 2)"
    assert block["points"] == "9 (scored 7, unscored 1, quality_failed 1)"
    # the fastest supported row reaching each target: unconfirmed trials and REVERTs never answer
    assert block["best_at_0.9"].startswith("decode_tps=120 ")
    assert block["best_at_0.95"].startswith("decode_tps=120 ")
    assert block["best_at_0.99"].startswith("decode_tps=120 ")
    assert block["best_at_0.995"].startswith("decode_tps=100 ")
    assert proc.stdout.splitlines()[-1].startswith("table: ")  # no JSON line without --json

    png = out / "pareto-proto1.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    report = (out / "analysis.md").read_text()
    assert "| 0.95 | 120 | 0.99 | agent | KEEP | `c000001` fuse the MLP | results.tsv:3 |" in report
    assert "| 0.995 | 100 | 1 | agent | BASELINE |" in report
    candidates = report.split("### Search candidates")[1]
    assert "| 140 | 0.92 | search | MEASURED | search `{\"KV_BITS\": 4}` | results.tsv:10 |" in candidates
    assert "bigger prefill step" not in report  # the REVERT is in no table
    assert "![speed vs quality](pareto-proto1.png)" in report

    # progress: the baseline's tok/s, times the KEEP's paired speedup (not its absolute tok/s)
    line = analyze.progress(analyze.load_points([path]))["main"]
    assert [level for _, level in line] == [100.0, 125.0]


def test_analyze_json_is_the_last_line_and_agrees_with_the_files(tmp_path):
    _write_ledger(tmp_path / "results.tsv")
    out = tmp_path / "out"
    proc = _run("results.tsv", "--target-quality", "0.995", "--out", str(out), "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    *text, last = proc.stdout.strip().splitlines()
    data = json.loads(last)
    assert isinstance(data, dict)
    assert not any(line.startswith("{") for line in text)  # one JSON object, and it is the last line
    block = dict(line.split(": ", 1) for line in text if ": " in line)  # the key: value block still comes first
    assert block["frontier"] == "2"

    assert data["files"] == ["results.tsv"] and data["targets"] == [0.9, 0.95, 0.99, 0.995]
    assert len(data["protocols"]) == 1
    group = data["protocols"][0]
    assert (group["protocol"], group["model"], group["preset"]) == ("proto1", "tiny", "quick")
    assert group["counts"]["points"] == 9 and group["counts"]["excluded_by"] == {"CRASH": 2}

    # the files it names are the ones written
    png, table = Path(group["plot"]), Path(data["table"])
    assert (png, table) == (out / "pareto-proto1.png", out / "analysis.md")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and block["plot"] == group["plot"]
    report = table.read_text()

    # frontier: the same rows, in the same order (fastest first), as the block and the markdown
    frontier = group["frontier"]
    assert {row["line"] for row in frontier} == FRONTIER_LINES
    assert [row["decode_tps"] for row in frontier] == [120.0, 100.0]
    assert all(row["supported"] and row["confirmed_by"] is None for row in frontier)
    frontier_table = report.split("### Pareto frontier")[1].split("### Search candidates")[0]
    for i, row in enumerate(frontier):
        assert block[f"frontier_{i}"].endswith(f"row=results.tsv:{row['line']}")
        assert f"| {row['decode_tps']:g} | {row['quality_score']:g} | {row['source']} | {row['decision']} |" \
            in frontier_table
    rows_in_table = [line.rsplit("results.tsv:", 1)[1].split(" ")[0] for line in frontier_table.splitlines()
                     if "results.tsv:" in line]
    assert rows_in_table == [str(row["line"]) for row in frontier]
    candidates = group["candidates"]
    assert [row["decode_tps"] for row in candidates] == [140.0, 130.0]
    assert candidates[0]["config"] == json.dumps({"KV_BITS": 4}) and not candidates[0]["supported"]

    # best per target: keyed as the block writes the target, each the same row as the block and the markdown
    assert set(group["best"]) == {"0.9", "0.95", "0.99", "0.995"}
    for target, row in group["best"].items():
        assert block[f"best_at_{target}"].endswith(f"row=results.tsv:{row['line']}")
        assert f"| {target} | {row['decode_tps']:g} | {row['quality_score']:g} | {row['source']} | " \
               f"{row['decision']} |" in report
        assert f"results.tsv:{row['line']} |" in next(line for line in report.splitlines()
                                                      if line.startswith(f"| {target} |"))
    assert [group["best"][t]["decode_tps"] for t in ("0.9", "0.95", "0.99", "0.995")] == [120, 120, 120, 100]


def _agent_row(commit, decision, tps, quality=1.0, *, when, branch="hillclimb", speedup=None, config=None,
               source="agent"):
    return {"timestamp": when.isoformat(timespec="seconds"), "commit": commit, "branch": branch,
            "subject": f"{decision.lower()} {commit}", "source": source, "protocol": "proto1", "model": "tiny",
            "preset": "quick", "decision": decision, "reason": "test row", "decode_tps": tps,
            "quality_score": quality, "quality_pass": "true", "speedup": speedup, "dirty": False,
            "config": json.dumps(config) if config else None}


def test_a_revert_is_never_recommended_even_when_fastest(tmp_path):
    """The issue's night: a REVERTed commit measured at a quiet moment has the highest
    absolute tok/s, every point sits at quality 1.0; main has a lone baseline."""
    t0 = datetime(2026, 3, 14, 22, 0, tzinfo=timezone.utc)
    path = tmp_path / "results.tsv"
    rows = [_agent_row("aaaaaaa", "BASELINE", 7.0, when=t0, branch="main"),
            _agent_row("aaaaaaa", "BASELINE", 7.1, when=t0 + timedelta(minutes=15)),
            _agent_row("bbbbbbb", "REVERT", 9.5, when=t0 + timedelta(minutes=30), speedup=1.004),
            _agent_row("ccccccc", "KEEP", 7.4, 0.9999, when=t0 + timedelta(minutes=45), speedup=1.05),
            _agent_row("ddddddd", "REVERT", 9.9, 0.99999, when=t0 + timedelta(minutes=60), speedup=0.99)]
    for row in rows:
        ledger.append(path, row)
    points = analyze.confirm_trials(analyze.load_points([path]))
    recommended = analyze.frontier_points(points) + [p for p in analyze.best_at_targets(
        points, (0.9, 0.99, 0.9999, 0.99999)).values() if p]
    assert recommended and all(p["decision"] != "REVERT" for p in recommended)
    assert {p["commit"] for p in analyze.frontier_points(points)} == {"aaaaaaa", "ccccccc"}
    assert analyze.best_at_targets(points, (0.99999,))[0.99999]["commit"] == "aaaaaaa"

    # the plot: a log quality-loss axis (differences near 1.0 show) and no flat line for main
    fig = plots.figure(points, analyze.frontier_points(points), (0.9, 0.99), "t", analyze.progress(points))
    top, bottom = fig.axes
    assert top.get_yscale() == "log"
    labels = [line.get_label() for line in bottom.get_lines()]
    assert any("hillclimb" in label for label in labels)
    assert not any("main" in label for label in labels)  # main's lone baseline is a marker, not a line
    assert any("main: baseline only" in str(c.get_label()) for c in bottom.collections)
    plots.pyplot().close(fig)


def test_a_search_trial_is_recommended_once_a_paired_keep_confirms_it(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q", "-b", "hillclimb")
    git(root, "config", "user.email", "t@example.com")
    git(root, "config", "user.name", "T")
    (root / "inference.py").write_text("TEMP = 0.7\nKV_BITS = None\n")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "baseline")
    base = git(root, "rev-parse", "--short=7", "HEAD")
    (root / "inference.py").write_text("TEMP = 0.0  # from the search\nKV_BITS = None\n")
    git(root, "commit", "-qam", "knobs from search")
    keep = git(root, "rev-parse", "--short=7", "HEAD")
    t0 = datetime(2026, 3, 14, 22, 0, tzinfo=timezone.utc)
    path = root / "results.tsv"
    for row in [_agent_row(base, "BASELINE", 100.0, when=t0),
                _agent_row(base, "MEASURED", 130.0, 0.999, when=t0 + timedelta(minutes=5), source="search",
                           config={"TEMP": 0.0, "KV_BITS": None}),
                _agent_row(base, "MEASURED", 150.0, 0.999, when=t0 + timedelta(minutes=6), source="search",
                           config={"TEMP": 0.0, "KV_BITS": 8}),
                _agent_row(keep, "KEEP", 105.0, 0.999, when=t0 + timedelta(minutes=20), speedup=1.2)]:
        ledger.append(path, row)
    points = analyze.confirm_trials(analyze.load_points([path]))
    confirmed, unconfirmed = points[1], points[2]
    assert confirmed["confirmed_by"] == keep and analyze.supported(confirmed)
    assert unconfirmed["confirmed_by"] is None and not analyze.supported(unconfirmed)
    assert analyze.best_at_targets(points, (0.99,))[0.99] is confirmed  # 130 tok/s, confirmed
    assert analyze.candidate_points(points) == [unconfirmed]
    assert "confirmed by KEEP" in analyze.describe(confirmed)


def test_analyze_in_process_matches_the_rules():
    rows = [dict(zip(ledger.COLUMNS, [""] * len(ledger.COLUMNS)), line=n) for n in range(2, 6)]
    rows[0].update(decision="KEEP", decode_tps="10", quality_score="0.99", quality_pass="true")
    rows[1].update(decision="REJECT", decode_tps="50", quality_score="1.0")
    rows[2].update(decision="MEASURED", decode_tps="20", quality_score="0.98", quality_pass="false")
    rows[3].update(decision="MEASURED", decode_tps="30")
    points = [analyze.point(r) for r in rows]
    assert [p["status"] for p in points] == ["scored", "excluded", "quality_failed", "unscored"]
    assert analyze.frontier_points(points) == [points[0]]


def test_bad_input_is_one_clear_line(tmp_path):
    def error(*files):
        proc = _run(*files, "--out", str(tmp_path / "out"), cwd=tmp_path)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        return lines[0]

    assert "not found" in error(str(tmp_path / "missing.tsv"))
    empty = tmp_path / "empty.tsv"
    empty.write_text(ledger.HEADER)
    assert "no rows" in error(str(empty))
    other = tmp_path / "other.tsv"
    other.write_text("a\tb\n1\t2\n")
    assert "not a results.tsv" in error(str(other))


def test_a_later_champion_supersedes_the_commits_on_its_chain(tmp_path):
    """The real night: main's quick-start BASELINE, measured at a quiet moment, is faster in
    absolute tok/s than the branch's KEEP that started from the same commit and beat it side
    by side. The KEEP is the recommendation; a champion of better quality stays one."""
    t0 = datetime(2026, 3, 14, 22, 0, tzinfo=timezone.utc)
    path = tmp_path / "results.tsv"
    rows = [_agent_row("aaaaaaa", "BASELINE", 6.3, when=t0, branch="main"),
            _agent_row("aaaaaaa", "BASELINE", 4.5, when=t0 + timedelta(minutes=5)),
            _agent_row("bbbbbbb", "KEEP", 6.0, when=t0 + timedelta(minutes=30), speedup=1.02),
            _agent_row("ccccccc", "REVERT", 7.2, when=t0 + timedelta(minutes=40), speedup=1.02),
            _agent_row("ddddddd", "KEEP", 6.1, 0.999, when=t0 + timedelta(minutes=50), speedup=1.03)]
    for row in rows:
        ledger.append(path, row)
    points = analyze.supersede(analyze.confirm_trials(analyze.load_points([path])))
    by_line = {p["line"]: p for p in points}
    assert by_line[2]["superseded_by"] == by_line[3]["superseded_by"] == "bbbbbbb"
    # ddddddd is worse in quality than bbbbbbb: bbbbbbb stays for the higher target
    assert by_line[4]["superseded_by"] is None and by_line[6]["superseded_by"] is None
    best = analyze.best_at_targets(points, (0.99, 1.0))
    assert best[0.99]["commit"] == "ddddddd" and best[1.0]["commit"] == "bbbbbbb"
    assert {p["commit"] for p in analyze.frontier_points(points)} == {"bbbbbbb", "ddddddd"}
