"""Progress of a long step (an epoch of training, chunks of generated data), readable on a terminal
and in a log file.

On a terminal one status line is rewritten in place; anywhere else (a log file, CI) a plain line is
written at most every `every` seconds and for the last update, never carriage-return updates.
"""
import sys
import time


class Progress:
    def __init__(self, enabled: bool = True, stream=None, every: float = 10.0):
        self.enabled, self.every = enabled, every
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.started = self.last_written = time.monotonic()
        self.line = ""

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started

    def show(self, line: str) -> None:
        if not self.enabled:
            return
        self.line = line
        if self.live:
            self.stream.write("\r\033[K" + self.line)
            self.stream.flush()
        elif time.monotonic() - self.last_written >= self.every:
            self.write_line()

    def close(self) -> None:
        """Finish the live line, or write the last update's line if the log has not seen it."""
        if not self.enabled or not self.line:
            return
        if self.live:
            self.stream.write("\r\033[K")
        self.write_line()

    def write_line(self) -> None:
        self.stream.write(self.line + "\n")
        self.stream.flush()
        self.last_written = time.monotonic()
        self.line = ""


class EpochProgress(Progress):
    """The epoch, the validation figures, the best epoch so far, the patience left and the time spent.
    No time left is shown: early stopping ends runs long before --max-epochs."""

    def __init__(self, desc: str, max_epochs: int, enabled: bool = True, stream=None, every: float = 10.0):
        super().__init__(enabled, stream, every)
        self.desc, self.max_epochs = desc, max_epochs

    def update(self, epoch: int, val_nll: float, val_error: float, best_epoch: int, best_nll: float,
               patience_left: int) -> None:
        self.show(f"{self.desc}: epoch {epoch + 1} (at most {self.max_epochs}), val NLL {val_nll:.4f}, val error "
                  f"{val_error:.4f}, best {best_nll:.4f} at epoch {best_epoch + 1}, patience left {patience_left}, "
                  f"{self.seconds:.0f} s")
