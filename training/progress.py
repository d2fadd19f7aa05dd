"""Epoch-by-epoch progress of a training run, readable on a terminal and in a log file."""
import sys
import time


class EpochProgress:
    """The epoch, the validation figures, the best epoch so far, the patience left and the time spent.

    On a terminal one status line is rewritten in place; anywhere else (a log file, CI) a plain line
    is written at most every `every` seconds and for the last epoch, never carriage-return updates.
    No time left is shown: early stopping ends runs long before --max-epochs.
    """

    def __init__(self, desc: str, max_epochs: int, enabled: bool = True, stream=None, every: float = 10.0):
        self.desc, self.max_epochs, self.enabled, self.every = desc, max_epochs, enabled, every
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.started = self.last_written = time.monotonic()
        self.line = ""

    def update(self, epoch: int, val_nll: float, val_error: float, best_epoch: int, best_nll: float,
               patience_left: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        self.line = (f"{self.desc}: epoch {epoch + 1} (at most {self.max_epochs}), val NLL {val_nll:.4f}, val error "
                     f"{val_error:.4f}, best {best_nll:.4f} at epoch {best_epoch + 1}, patience left {patience_left}, "
                     f"{now - self.started:.0f} s")
        if self.live:
            self.stream.write("\r\033[K" + self.line)
            self.stream.flush()
        elif now - self.last_written >= self.every:
            self.write_line()

    def close(self) -> None:
        """Finish the live line, or write the last epoch's line if the log has not seen it."""
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
