"""The one reporting module: plain lines for logs, rich on a terminal, tqdm in notebooks, silence."""

import io
import sys

from vitup_cli import progress
from vitup_cli.progress import Reporter, RichReporter, SilentReporter, TqdmReporter, default_reporter


def test_log_lines_report_count_rate_eta_and_fields():
    out = io.StringIO()
    rep = Reporter(interval=3600, stream=out)
    rep.start(4, "extract")
    rep.advance(1)
    assert out.getvalue() == ""  # nothing before the interval...
    rep.advance(3, loss=0.123456, lr=2e-4)
    line = out.getvalue().strip()  # ...and one line at the end of the bar
    assert line.startswith("extract: 4/4 img (100%)") and "img/s" in line and "ETA 0:00:00" in line
    assert "loss 0.1235" in line and "lr 2.00e-04" in line
    rep.warning("careful")
    assert out.getvalue().strip().endswith("warning: careful")


def test_update_sets_the_position_and_counts_rate_from_start():
    out = io.StringIO()
    rep = Reporter(interval=0, stream=out)
    rep.start(10, "train", done=6, unit="step")
    rep.update(8, {"loss": 1.5})
    assert "train: 8/10 step (80%)" in out.getvalue() and "loss 1.5000" in out.getvalue()
    assert rep.rate() > 0
    rep.close()


def test_silent_reporter_says_nothing(capsys):
    rep = SilentReporter()
    rep.info("x")
    rep.warning("y")
    rep.start(1, "z")
    rep.advance(1)
    rep.finish()
    assert capsys.readouterr().err == ""


def test_rich_and_tqdm_bars_run_through(capsys):
    for rep in (RichReporter(), TqdmReporter()):
        rep.start(3, "job")
        rep.advance(2, loss=0.5)
        rep.update(3)
        rep.message("hello")
        rep.finish()
    assert "hello" in capsys.readouterr().err


def test_default_reporter_follows_the_output(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    monkeypatch.setattr(progress, "in_notebook", lambda: False)
    assert type(default_reporter()) is Reporter
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert isinstance(default_reporter(), RichReporter)
    monkeypatch.setattr(progress, "in_notebook", lambda: True)
    assert isinstance(default_reporter(), TqdmReporter)


def test_human_bytes():
    assert progress.human_bytes(999) == "999 B" and progress.human_bytes(38_500_000) == "38.5 MB"
