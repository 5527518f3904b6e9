"""Progress output that fits where it goes: bars on a terminal, plain lines in logs and CI.

A carriage-return bar redrawn in place reads well where a person watches a terminal, and turns into
one long line of overwritten text in a log file or a CI page. `interactive()` is the one decision
(is the stream a TTY?); `progress()` wraps a loop and `StatusLine` reports what runs now.
"""
from __future__ import annotations

import sys
from typing import Iterable, Iterator, TextIO, TypeVar

T = TypeVar("T")


def interactive(stream: TextIO | None = None) -> bool:
    """Whether `stream` (default stderr) is a terminal: bars there, plain lines anywhere else."""
    stream = stream if stream is not None else sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


def progress(iterable: Iterable[T], desc: str, total: int | None = None, *, stream: TextIO | None = None,
             every: int = 1, **bar_options) -> Iterator[T]:
    """`iterable`, with a tqdm bar on a terminal, else a line `desc: i/total` after every `every` items.

    `bar_options` go to tqdm (unit, mininterval, ...) and are ignored without a terminal.
    """
    stream = stream if stream is not None else sys.stderr
    if interactive(stream):
        from tqdm import tqdm

        yield from tqdm(iterable, desc=desc, total=total, file=stream, **bar_options)
        return
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    of = f"/{total}" if total is not None else ""
    i = 0
    for i, item in enumerate(iterable, 1):
        yield item
        if i % max(1, every) == 0 or i == total:
            print(f"{desc}: {i}{of}", file=stream, flush=True)


class StatusLine:
    """What runs now, as `status("building b0 on openvino")` calls.

    On a terminal one line is rewritten in place and `close()` clears it; elsewhere each message is
    a line of its own and `close()` writes nothing.
    """

    def __init__(self, stream: TextIO | None = None, width: int = 60) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty, self.width, self.shown = interactive(self.stream), width, False

    def __call__(self, message: str) -> None:
        if self.tty:
            self.stream.write(f"\r{message:<{self.width}}")
            self.shown = True
        else:
            self.stream.write(f"{message}\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self.shown:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.shown = False

    def __enter__(self) -> "StatusLine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
