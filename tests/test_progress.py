"""Progress and stage lines: a run redirected to run.log says where it is."""

import io
import re

from harness import report

STAMP = r"\[\d\d:\d\d:\d\d\] "


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_writes_timestamped_lines_to_a_file_at_most_every_interval():
    stream = io.StringIO()  # not a terminal, as with `> run.log 2>&1`
    progress = report.Progress("speed", stream, unit="calls", every_s=3600)
    for done in range(1, 37):
        progress(done, 36, f"champion prompt{done}")
    lines = stream.getvalue().splitlines()
    # the first step, then nothing until the interval has passed, and the last step
    assert len(lines) == 2, lines
    assert re.fullmatch(STAMP + r"speed 1/36 calls \(champion prompt1\)", lines[0])
    assert re.fullmatch(STAMP + r"speed 36/36 calls \(champion prompt36\)", lines[1])
    assert "\r" not in stream.getvalue() and "#" not in stream.getvalue()

    stream = io.StringIO()
    progress = report.Progress("quality: tasks", stream, every_s=0)
    for done in range(1, 4):
        progress(done, 8, "add_small")
    assert [re.sub(STAMP, "", line) for line in stream.getvalue().splitlines()] == [
        "quality: tasks 1/8 (add_small)", "quality: tasks 2/8 (add_small)", "quality: tasks 3/8 (add_small)"]


def test_a_terminal_keeps_the_bar():
    stream = Tty()
    progress = report.Progress("speed", stream, unit="calls")
    progress(1, 2, "challenger")
    progress(2, 2, "champion")
    text = stream.getvalue()
    assert text.startswith("\rspeed [") and "2/2" in text and text.endswith("\n")
    assert not re.search(STAMP, text)


def test_stage_lines_are_always_written():
    for stream in (io.StringIO(), Tty()):
        report.stage("reference: corpus (320 tokens)", stream)
        assert re.fullmatch(STAMP + r"stage: reference: corpus \(320 tokens\)\n", stream.getvalue())
