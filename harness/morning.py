"""`python prepare.py report [--out FILE]`: the morning report as one self-contained HTML page.

The same data as `prepare.py log --summary` (harness/summary.py) for the current branch:
baseline vs champion with the chained speedup, counts by decision and hours, every
experiment with its decision, speedup, lines and tradeoff warnings, then three plots:
paired speedups with their intervals, progress over time, speed vs quality. Plots are
embedded as base64 PNG and the styles inline, so the file opens in any browser, offline,
and can be mailed as it is. Prints `report: PATH` on stdout.
"""

import base64
import html
import io
from datetime import datetime, timezone
from pathlib import Path

from harness import analyze, ledger, monitor, plots, summary
from harness.log import format_speedup
from harness.report import note
from harness.settings import ROOT

DEFAULT_OUT = Path("analysis") / "morning-report.html"  # analysis/ is git-ignored
WARNING_TEXT = {rule.id: rule.message for rule in monitor.RULES}

STYLE = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 24px auto;
       max-width: 1220px; color: #222; font-size: 14px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; }
.meta { color: #555; margin: 2px 0; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.reason { color: #444; max-width: 360px; }
.badge { padding: 1px 6px; border-radius: 3px; font-weight: 600; font-size: 12px; color: white; }
.BASELINE, .KEEP { background: #2ca02c; } .REVERT { background: #d62728; }
.CRASH, .INVALID, .REJECT { background: #333; } .MEASURED { background: #1f77b4; }
tr.gone td { color: #888; } .big { font-size: 18px; font-weight: 600; }
img { max-width: 100%; border: 1px solid #eee; margin: 6px 0; }
.note { color: #666; font-size: 12px; }
"""


def _e(value):
    return html.escape("" if value is None else str(value))


def png_data_uri(fig, dpi=100):
    """`fig` as a data: URI of a PNG (closes the figure)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plots.pyplot().close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def branch_points(root, data):
    """analyze points of this branch's runs of the summary's protocol."""
    rows, _ = ledger.read(Path(root) / "results.tsv")
    mine = [r for r in ledger.branch_rows(rows, data["branch"]) if r["protocol"] == data["protocol"]]
    return analyze.supersede([analyze.point(r, "results.tsv") for r in mine])


def figures(root, data, min_effect):
    """[(title, data URI)] of the report's plots; none when the branch has no runs."""
    plt = plots.pyplot()
    out = []
    experiments = data["experiments"]
    if experiments:
        fig, ax = plt.subplots(figsize=(11, 0.9 + 0.32 * len(experiments)))
        plots.speedup_panel(ax, experiments, min_effect)
        fig.tight_layout()
        out.append(("Paired speedups", png_data_uri(fig)))
    points = branch_points(root, data)
    if points:
        fig, ax = plt.subplots(figsize=(11, 4.2))
        plots.progress_panel(ax, points, analyze.progress(points))
        fig.tight_layout()
        out.append(("Progress over time", png_data_uri(fig)))
        fig, ax = plt.subplots(figsize=(11, 5.2))
        plots.quality_panel(ax, points, analyze.frontier_points(points), analyze.DEFAULT_TARGETS,
                            "speed vs quality: green = champions, red = REVERTs (never recommended)")
        fig.tight_layout()
        out.append(("Speed vs quality", png_data_uri(fig)))
    return out


def _table(header, rows, numeric=()):
    """An HTML table; cells are (text, css class or None) or plain text (escaped here)."""
    out = ["<table>", "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>"]
    for row in rows:
        cls, cells = row
        tds = []
        for i, cell in enumerate(cells):
            text, raw = (cell, False) if not isinstance(cell, tuple) else (cell[0], True)
            klass = ' class="num"' if i in numeric else (' class="reason"' if header[i] == "reason" else "")
            tds.append(f"<td{klass}>{text if raw else _e(text)}</td>")
        out.append(f'<tr class="{cls}">' + "".join(tds) + "</tr>")
    return "\n".join(out + ["</table>"])


def champion_section(data):
    """Baseline vs champion: the metrics table and the chained speedup."""
    if data["baseline"] is None:
        return "<p>No baseline on this branch yet: run <code>.venv/bin/python prepare.py</code>.</p>"
    base, champ = data["baseline"], data["champion"] or data["baseline"]
    rows = [("", [m["label"], summary.show(m["baseline"]), summary.show(m["champion"]), m["change"] or ""])
            for m in data["metrics"]]
    keeps = data["keeps"]
    chain = ", ".join(f"{_e(k['commit'])} {_e(k['subject'])} ({_e(format_speedup(k['speedup']))})"
                      for k in keeps) or "no KEEP yet"
    return "\n".join([
        f'<p class="big">chained speedup: {_e(format_speedup(data["chained_speedup"]))}</p>',
        f'<p class="note">the product of the paired speedups of the {len(keeps)} KEEP(s) since the '
        f"baseline: {chain}. Absolute tok/s of two runs taken hours apart swing with the machine's "
        "load; the chained speedup is what side-by-side runs showed.</p>",
        '<p>tradeoffs the champion carries (vs the baseline): '
        + (", ".join(f"<b>{_e(w)}</b> ({_e(WARNING_TEXT.get(w, ''))})" for w in data["champion_warnings"])
           or "none") + "</p>",
        f'<p class="meta">baseline: <b>{_e(base["commit"])}</b> {_e(base["subject"])}<br>'
        f'champion: <b>{_e(champ["commit"])}</b> {_e(champ["subject"])}</p>',
        _table(["metric", f"baseline {base['commit']}", f"champion {champ['commit']}", "change"],
               rows, numeric={1, 2, 3})])


def experiments_section(data):
    """Every experiment, with its decision as a coloured badge and its warnings spelled out."""
    rows, seen = [], []
    for e in data["experiments"]:
        cells = summary.experiment_cells(e)
        cells[4] = (f'<span class="badge {_e(e["decision"])}">{_e(e["decision"])}</span>',)
        rows.append(("gone" if not e["in_history"] else "", cells))
        seen += [w for w in e["warnings"] if w not in seen]
    out = [_table(summary.EXPERIMENT_HEADER, rows, numeric={0, 5, 6, 7, 8, 9, 10})
           if rows else "<p>No experiments yet.</p>",
           '<p class="note">* the champion; x (greyed) reset away after its verdict; lines: code '
           "lines against the baseline; speedup: geometric mean of the paired ratios against the champion of the "
           "time with its 95 % interval.</p>"]
    if seen:
        out.append("<h3>Tradeoff warnings</h3><ul>" + "".join(
            f"<li><b>{_e(w)}</b>: {_e(WARNING_TEXT.get(w, ''))}</li>" for w in seen) + "</ul>")
    return "\n".join(out)


def page(root, min_effect=0.01):
    """The whole report for the branch at `root`, as an HTML string."""
    data = summary.build(root)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    meta = f"model {data['model']}, {data['preset']} workload, protocol {data['protocol']}" \
        if data["model"] else "no runs on this branch yet"
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Morning report: {_e(data['branch'])}</title><style>{STYLE}</style></head><body>",
        f"<h1>Morning report: branch {_e(data['branch'] or '(detached HEAD)')}</h1>",
        f'<p class="meta">{_e(meta)}</p>', f'<p class="meta">{_e(summary.counts_text(data))}</p>',
        f'<p class="meta">written {when} by <code>prepare.py report</code> from results.tsv</p>',
        "<h2>Baseline vs champion</h2>", champion_section(data),
        "<h2>Experiments</h2>", experiments_section(data),
    ]
    for title, uri in figures(root, data, min_effect):
        parts += [f"<h2>{_e(title)}</h2>", f'<img alt="{_e(title)}" src="{uri}">']
    if data["other_protocols"]:
        parts.append(f'<p class="note">{data["other_protocols"]} run(s) of other protocols are not '
                     "shown: <code>prepare.py log</code> lists them.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _min_effect():
    """The verdict's min_effect from harness.yaml (the speedup plot marks it); 0.01 if unreadable."""
    try:
        from harness.settings import load_settings

        return load_settings().verdict.min_effect
    except Exception:  # a report is still worth writing with the default mark
        return 0.01


def add_parser(sub):
    """Add the `report` subcommand to the argparse subparsers `sub`."""
    parser = sub.add_parser("report", help="write the morning report: one self-contained HTML page")
    parser.add_argument("--out", default=None, help=f"the HTML file to write (default: {DEFAULT_OUT})")
    parser.set_defaults(func=run)
    return parser


def run(args):
    """Write the report, print `report: PATH` on stdout; returns the exit status."""
    root = Path(getattr(args, "root", None) or ROOT)
    if (root / "results.tsv").exists():
        ledger.check_header(root / "results.tsv")  # LedgerError: prepare.py says what to do, exit 2
    out = Path(args.out) if args.out else root / DEFAULT_OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page(root, _min_effect()), encoding="utf-8")
    note(f"open it in a browser: file://{out.resolve()}")
    print(f"report: {out}")
    return 0
