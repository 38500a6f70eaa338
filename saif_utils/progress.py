"""Progress a researcher can see: the library's loop bars (widgets in JupyterLab, text in a `make reproduce` run) and
the runner's live status line — which notebook and cell is running, for how long, against the last run's time, and
the innermost loop's bar — plus the source line of a cell that failed."""
from __future__ import annotations

import os
import re
import sys
import threading
import time
from typing import TextIO

from tqdm.auto import tqdm as _auto_tqdm
from tqdm.std import tqdm as _text_tqdm

TEXT_PROGRESS = "SAIF_TEXT_PROGRESS"
"""Set by the runner for its kernels: loop bars are written as text to stderr, which it shows live (a widget's
updates never leave the kernel as text)."""
TEXT_MININTERVAL = 2.0
"""Seconds between text updates: the executed notebook keeps them, so they must stay few."""


def tqdm(*args, **kwargs):
    """A progress bar: tqdm's notebook widget or console bar as `tqdm.auto` chooses, or a text bar on stderr under the
    runner (`SAIF_TEXT_PROGRESS=1`); none under tqdm's own `TQDM_DISABLE=1` (benchmarks), which an explicit
    `disable=False` from a caller would otherwise override."""
    if os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true"):
        kwargs["disable"] = True
    if os.environ.get(TEXT_PROGRESS) == "1":
        kwargs.setdefault("mininterval", TEXT_MININTERVAL)
        kwargs.setdefault("miniters", 1)  # tqdm's adaptive miniters would skip slow iterations after a fast first one
        kwargs.setdefault("file", sys.stderr)
        return _text_tqdm(*args, **kwargs)
    return _auto_tqdm(*args, **kwargs)


def clock(seconds: float) -> str:
    """'1:02:03' / '2:03'."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def first_code_line(source: str) -> str:
    """The first line of a cell that is neither blank nor a comment (what the status line shows for a cell)."""
    lines = [line.strip() for line in source.splitlines()]
    return next((line for line in lines if line and not line.startswith("#")), lines[0] if lines else "")


class LiveStatus:
    """One status line per running notebook, redrawn in place on a terminal (every `tty_every` s) or printed as a new
    line on a log (every `log_every` s): stage, cell i/n and its first line, elapsed time, the last run's time for
    the stage, and the latest text of the kernel's innermost progress bar."""

    def __init__(self, stage: str, n_cells: int, last_seconds: float | None, out: TextIO = sys.stdout,
                 tty_every: float = 1.0, log_every: float = 30.0):
        self.stage, self.n_cells, self.last_seconds, self.out = stage, n_cells, last_seconds, out
        self.tty = out.isatty()
        self.every = tty_every if self.tty else log_every
        self.start = time.perf_counter()
        self.cell, self.code, self.bar = 0, "", ""
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._thread = threading.Thread(target=self._tick, daemon=True, name="saif-status")

    def __enter__(self) -> LiveStatus:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self.tty:
            self.out.write("\r\033[K")
            self.out.flush()

    def line(self) -> str:
        """The status line as it stands now."""
        elapsed = time.perf_counter() - self.start
        of = f" (last run {clock(self.last_seconds)}" if self.last_seconds else ""
        if self.last_seconds:
            left = self.last_seconds - elapsed
            of += f", ≈ {clock(left)} left)" if left > 0 else ", over by " + clock(-left) + ")"
        code = self.code if len(self.code) <= 60 else self.code[:57] + "…"
        text = f"  {self.stage} · cell {self.cell}/{self.n_cells} · {code} · {clock(elapsed)}{of}"
        return text + (f" · {self.bar}" if self.bar else "")

    def cell_started(self, index: int, source: str) -> None:
        """A code cell (1-based `index` among the notebook's code cells) began."""
        with self._lock:
            self.cell, self.code, self.bar = index, first_code_line(source), ""
        if not self.tty:
            self.emit()

    def kernel_stderr(self, text: str) -> None:
        """Kernel stderr: a progress bar's latest state (after its last carriage return) becomes part of the status
        line; other complete lines (warnings) are passed through."""
        for chunk in re.split(r"(?<=\n)", text):
            if "\r" in chunk:
                state = chunk.rsplit("\r", 1)[-1].strip()
                with self._lock:
                    self.bar = re.sub(r"\s+", " ", state)[:80]
            elif chunk.strip():
                self.write(chunk.rstrip("\n"))

    def write(self, message: str) -> None:
        """Print a whole line above the status line."""
        with self._lock:
            self.out.write(("\r\033[K" if self.tty else "") + message + "\n")
            self.out.flush()

    def emit(self) -> None:
        """Draw the status line (in place on a terminal)."""
        with self._lock:
            text = self.line()
            if self.tty:
                self.out.write("\r\033[K" + text[: os.get_terminal_size(self.out.fileno()).columns - 1])
            else:
                self.out.write(text + "\n")
            self.out.flush()

    def _tick(self) -> None:
        while not self._stop.wait(self.every):
            self.emit()


class _StderrSink:
    """The file-like object papermill writes the kernel's stderr stream to."""

    def __init__(self, status: LiveStatus):
        self.status = status

    def write(self, text: str) -> None:
        self.status.kernel_stderr(text)

    def flush(self) -> None:
        pass


def live_engine(status: LiveStatus):
    """A papermill engine (nbclient underneath) that reports each code cell's start to `status`."""
    from papermill.engines import NBClientEngine, NotebookExecutionManager

    code_index: dict[int, int] = {}

    class LiveManager(NotebookExecutionManager):
        def cell_start(self, cell, cell_index=None, **kwargs):
            super().cell_start(cell, cell_index, **kwargs)
            if cell.cell_type == "code":
                code_index.setdefault(cell_index, len(code_index) + 1)
                status.cell_started(code_index[cell_index], cell.source)

    class LiveEngine(NBClientEngine):
        @classmethod
        def execute_notebook(cls, nb, kernel_name, output_path=None, progress_bar=False, log_output=False,
                             autosave_cell_every=30, **kwargs):
            # papermill's Engine.execute_notebook with our manager in place of its own
            nb_man = LiveManager(nb, output_path=output_path, progress_bar=False, log_output=log_output,
                                 autosave_cell_every=autosave_cell_every)
            nb_man.notebook_start()
            try:
                cls.execute_managed_notebook(nb_man, kernel_name, log_output=log_output,
                                             **kwargs | {"stderr_file": _StderrSink(status)})
            finally:
                nb_man.cleanup_pbar()
                nb_man.notebook_complete()
            return nb_man.nb

    return LiveEngine


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def failed_line(notebook_cells: list[dict], traceback: list[str] | None) -> str | None:
    """The source line a failed cell stopped at: IPython's traceback names it first ('Cell In[5], line 3'), and the
    cell is the code cell with that execution count. None when the traceback does not say."""
    where = re.search(r"Cell In\[(\d+)\], line (\d+)", ANSI.sub("", "\n".join(traceback or [])))
    if where is None:
        return None
    count, line = int(where.group(1)), int(where.group(2))
    for cell in notebook_cells:
        if cell.get("cell_type") == "code" and cell.get("execution_count") == count:
            lines = "".join(cell["source"]).splitlines()
            return lines[line - 1].strip() if 0 < line <= len(lines) else None
    return None
