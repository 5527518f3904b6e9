"""engines.progress: a bar where a person watches a terminal, plain lines in logs and CI."""
import io

from engines.progress import StatusLine, interactive, progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_only_a_terminal_is_interactive():
    assert interactive(Terminal()) and not interactive(io.StringIO())

    class Closed(io.StringIO):
        def isatty(self):
            raise ValueError("I/O operation on closed file")

    assert not interactive(Closed()) and not interactive(object())


def test_without_a_terminal_progress_writes_one_plain_line_per_step():
    out = io.StringIO()
    assert list(progress(range(3), "rounds", stream=out)) == [0, 1, 2]
    assert out.getvalue() == "rounds: 1/3\nrounds: 2/3\nrounds: 3/3\n" and "\r" not in out.getvalue()
    out = io.StringIO()
    assert list(progress(iter(range(5)), "steps", stream=out, every=2, unit="batch")) == [0, 1, 2, 3, 4]
    assert out.getvalue() == "steps: 2\nsteps: 4\n"  # no total known, every 2nd item; tqdm's options ignored


def test_on_a_terminal_progress_draws_a_bar_in_place():
    out = Terminal()
    assert list(progress(range(3), "rounds", stream=out, mininterval=0)) == [0, 1, 2]
    assert "\r" in out.getvalue() and "3/3" in out.getvalue()


def test_a_status_line_is_rewritten_on_a_terminal_and_a_line_each_elsewhere():
    out = io.StringIO()
    with StatusLine(out) as status:
        status("exporting b0")
        status("building b0 on openvino")
    assert out.getvalue() == "exporting b0\nbuilding b0 on openvino\n"
    out = Terminal()
    with StatusLine(out, width=30) as status:
        status("exporting b0")
        status("building b0")
    text = out.getvalue()
    assert "\n" not in text and text.count("\r") == 4 and text.endswith("\r" + " " * 30 + "\r")
