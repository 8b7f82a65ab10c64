"""`prepare.py log`: the branch's history from results.tsv, in a real git repository."""

import json

from conftest import git, make_project

from harness import ledger, log

PROTOCOL = "p1"


def _row(commit, decision, *, subject="idea", speedup=None, ci=(None, None), dirty=False,
         protocol=PROTOCOL, quality=None, reason="because", tps=100.0, branch="main"):
    return {"timestamp": "2026-01-01T00:00:00+00:00", "commit": commit, "branch": branch,
            "subject": subject, "source": "agent", "protocol": protocol, "model": "tiny",
            "preset": "quick", "decision": decision, "reason": reason, "decode_tps": tps,
            "speedup": speedup, "speedup_lo": ci[0], "speedup_hi": ci[1], "dirty": dirty,
            "quality_pass": quality}


def _commit(root, message):
    (root / "inference.py").write_text(f"# {message}\n")
    git(root, "add", "-A")
    git(root, "commit", "-qm", message)
    return git(root, "rev-parse", "--short=7", "HEAD")


def _repo(tmp_path):
    """A git repository: main with base -> keep1 -> revert1, and a side branch off base."""
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q", "-b", "main")
    git(root, "config", "user.email", "test@example.com")
    git(root, "config", "user.name", "Test")
    commits = {"base": _commit(root, "base")}
    git(root, "checkout", "-qb", "side")
    commits["side"] = _commit(root, "side idea")
    git(root, "checkout", "-q", "main")
    commits["keep1"] = _commit(root, "argmax sampling")
    commits["revert1"] = _commit(root, "8-bit KV cache")
    return root, commits


def _ledger(root, commits):
    path = root / "results.tsv"
    ledger.append(path, _row(commits["base"], "BASELINE", subject="base"))
    ledger.append(path, _row(commits["side"], "KEEP", subject="side idea", branch="side",
                             speedup=1.2, ci=(1.1, 1.3), quality=True))
    ledger.append(path, _row(commits["keep1"], "KEEP", subject="argmax sampling", speedup=1.041,
                             ci=(1.02, 1.063), quality=True, reason="faster beyond noise"))
    ledger.append(path, _row(commits["revert1"], "REVERT", subject="8-bit KV cache", speedup=0.95,
                             ci=(0.93, 0.97), quality=False, reason="gate kl_mean failed"))
    # a dirty KEEP-looking row can never be the champion
    ledger.append(path, _row(commits["revert1"], "KEEP", dirty=True, speedup=1.5, ci=(1.4, 1.6)))
    return path


def test_champion_row_rules():
    rows = [dict(_row("aaaaaaa", "BASELINE"), line=2), dict(_row("bbbbbbb", "KEEP"), line=3),
            dict(_row("ccccccc", "REVERT"), line=4), dict(_row("ddddddd", "KEEP", dirty=True), line=5),
            dict(_row("eeeeeee", "KEEP"), line=6), dict(_row("fffffff", "MEASURED"), line=7)]
    for row in rows:  # as harness.ledger.read gives them: text cells
        row["dirty"] = "true" if row["dirty"] else "false"
    assert ledger.champion_row(rows, ["fffffff", "ddddddd", "ccccccc", "bbbbbbb", "aaaaaaa"])["line"] == 3
    assert ledger.champion_row(rows, ["aaaaaaa"])["line"] == 2
    assert ledger.champion_row(rows, ["eeeeeee", "aaaaaaa"])["line"] == 6
    assert ledger.champion_row(rows, ["eeeeeee"], protocol="other") is None
    assert ledger.champion_row(rows, ["bbbbbbb"], branch="side") is None
    assert ledger.champion_row([], ["aaaaaaa"]) is None


def test_format_speedup():
    assert log.format_speedup("1.041", "1.02", "1.063") == "+4.1 % [+2.0, +6.3]"
    assert log.format_speedup("0.95", "0.93", "0.97") == "-5.0 % [-7.0, -3.0]"
    assert log.format_speedup("1.0", "", "") == "+0.0 %"
    assert log.format_speedup("") == "-"


def test_history_marks_champion_and_hides_other_branches(tmp_path):
    root, commits = _repo(tmp_path)
    _ledger(root, commits)
    data = log.history(root)
    shown = [(r["commit"], r["decision"]) for r in data["rows"]]
    assert (commits["side"], "KEEP") not in shown and data["hidden"] == 1
    assert data["champion"]["commit"] == commits["keep1"]
    text = log.format_table(data)
    lines = text.splitlines()
    champion_line = next(line for line in lines if commits["keep1"] in line and "argmax" in line)
    assert champion_line.startswith("*")
    assert "+4.1 % [+2.0, +6.3]" in champion_line and "pass" in champion_line
    assert "faster beyond noise" in champion_line and "104.1" not in champion_line
    revert_line = next(line for line in lines if "8-bit KV cache" in line)
    assert "-5.0 % [-7.0, -3.0]" in revert_line and "FAIL" in revert_line
    assert "gate kl_mean failed" in revert_line and not revert_line.startswith("*")
    assert f"{commits['revert1']}+" in text  # the dirty row is shown, marked
    assert sum(line.startswith("*") for line in lines) == 2  # the row and the footer
    assert "--all" in text and "side idea" not in text

    everything = log.history(root, show_all=True)
    assert everything["hidden"] == 0 and len(everything["rows"]) == 5
    text = log.format_table(everything)
    side_line = next(line for line in text.splitlines() if "side idea" in line)
    assert side_line.startswith("x")
    assert everything["champion"]["commit"] == commits["keep1"]  # --all never moves the champion

    # on the side branch, its own KEEP is the champion and main's runs are hidden
    git(root, "checkout", "-q", "side")
    side = log.history(root)
    assert side["champion"]["commit"] == commits["side"]
    assert {r["commit"] for r in side["rows"]} == {commits["base"], commits["side"]}


def test_newest_protocol_decides_the_champion(tmp_path):
    root, commits = _repo(tmp_path)
    path = root / "results.tsv"
    ledger.append(path, _row(commits["base"], "BASELINE", protocol="old"))
    ledger.append(path, _row(commits["keep1"], "KEEP", protocol="old"))
    ledger.append(path, _row(commits["revert1"], "BASELINE", protocol="new"))
    data = log.history(root)
    assert data["protocol"] == "new" and data["champion"]["commit"] == commits["revert1"]
    text = log.format_table(data)
    assert "-- protocol old" in text and "-- protocol new" in text


def test_malformed_line_is_reported_and_the_rest_shown(tmp_path, capsys):
    root, commits = _repo(tmp_path)
    path = _ledger(root, commits)
    lines = path.read_text().splitlines(keepends=True)
    lines.insert(3, "garbage\twith\tthree fields\n")  # becomes line 4 of the file
    path.write_text("".join(lines))

    class Args:
        all = False
        json = False

    Args.root = root
    assert log.run(Args) == 0
    out, err = capsys.readouterr()
    assert "results.tsv line 4 has 3 fields" in err
    assert "argmax sampling" in out and "8-bit KV cache" in out and out.count("\n") >= 4

    Args.json = True
    assert log.run(Args) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["champion"] == commits["keep1"] and len(data["rows"]) == 4
    assert data["problems"] and "line 4" in data["problems"][0]


def test_no_ledger_yet(tmp_path, capsys):
    root, _ = _repo(tmp_path)

    class Args:
        all = False
        json = False

    Args.root = root
    assert log.run(Args) == 0
    assert "no results.tsv yet" in capsys.readouterr().err


def test_prepare_log_command(tmp_path):
    """`python prepare.py log` end to end, in a real copy of the project."""
    project = make_project(tmp_path / "project", tmp_path / "no-model-needed")
    base = git(project.root, "rev-parse", "--short=7", "HEAD")
    ledger.append(project.root / "results.tsv", _row(base, "BASELINE", subject="baseline"))
    project.edit_inference("TEMP = 0.7 ", "TEMP = 0.0 ")
    keep = project.commit("argmax")
    ledger.append(project.root / "results.tsv", _row(keep, "KEEP", subject="argmax", speedup=1.1,
                                                     ci=(1.05, 1.15), quality=True))
    git(project.root, "checkout", "-qb", "other", base)
    project.edit_inference("TOP_K = 0 ", "TOP_K = 5 ")
    other = project.commit("top-k")
    ledger.append(project.root / "results.tsv", _row(other, "REVERT", subject="top-k", branch="other"))
    git(project.root, "checkout", "-q", "main")

    proc = project.run("log")
    assert proc.returncode == 0, proc.stderr
    assert "+10.0 % [+5.0, +15.0]" in proc.stdout and "top-k" not in proc.stdout
    assert next(line for line in proc.stdout.splitlines() if keep in line).startswith("*")

    proc = project.run("log", "--all")
    assert proc.returncode == 0 and "top-k" in proc.stdout

    proc = project.run("log", "--json")
    assert json.loads(proc.stdout)["champion"] == keep


def test_reverted_experiments_stay_visible_after_a_reset(tmp_path):
    """The agent's loop: a baseline on main (the quick start), a new branch, its own BASELINE
    of the same commit, a KEEP, a REVERT and a CRASH each reset away. `log` on the branch
    shows every experiment of the branch; main's run is in a separate, labelled section."""
    root, commits = _repo(tmp_path)
    (root / ".gitignore").write_text("results.tsv*\n")  # as in the project: a reset never touches it
    path = root / "results.tsv"
    ledger.append(path, _row(commits["base"], "BASELINE", subject="base"))  # the quick start, on main
    git(root, "checkout", "-qb", "hillclimb/night", commits["base"])
    ledger.append(path, _row(commits["base"], "BASELINE", subject="base", branch="hillclimb/night"))
    keep = _commit(root, "argmax sampling")
    ledger.append(path, _row(keep, "KEEP", subject="argmax sampling", speedup=1.05, ci=(1.02, 1.08),
                             quality=True, branch="hillclimb/night"))
    tried = {}
    for subject, decision in (("4-bit KV cache", "REVERT"), ("typo in load", "CRASH")):
        tried[subject] = _commit(root, subject)
        ledger.append(path, _row(tried[subject], decision, subject=subject, branch="hillclimb/night",
                                 reason=f"{decision.lower()} reason"))
        git(root, "reset", "-q", "--hard", keep)  # what the agent does after a REVERT or CRASH

    data = log.history(root)
    assert data["branch"] == "hillclimb/night" and data["champion"]["commit"] == keep
    mine = [r for r in data["rows"] if r["this_branch"]]
    assert [r["subject"] for r in mine] == ["base", "argmax sampling", "4-bit KV cache", "typo in load"]
    assert [r["in_history"] for r in mine] == [True, True, False, False]
    others = [r for r in data["rows"] if not r["this_branch"]]
    assert [(r["branch"], r["decision"]) for r in others] == [("main", "BASELINE")]
    # main's later commits (keep1, revert1 of _repo) are outside this history: hidden, counted
    assert data["hidden"] == 0  # _ledger() was not written here: only the rows above exist

    text = log.format_table(data)
    head, other = text.split("other branches")
    assert head.startswith("branch hillclimb/night: 4 run(s)")
    assert head.count("BASELINE") == 1  # main's BASELINE of the same commit is not the branch's
    for subject in tried:
        line = next(line for line in head.splitlines() if subject in line)
        assert line.startswith("x") and tried[subject] in line
    assert next(line for line in head.splitlines() if "argmax" in line).startswith("*")
    assert "x: no longer in this branch's history" in head
    main_line = next(line for line in other.splitlines() if commits["base"] in line)
    assert " main " in main_line and "BASELINE" in main_line

    # --json: the same rows, each saying which section it is in
    data_json = log.history_json(log.history(root))
    assert data_json["branch"] == "hillclimb/night" and data_json["champion"] == keep
    assert sum(r["this_branch"] for r in data_json["rows"]) == 4
