"""The predictions that may still be told their true label, and the labels told: one SQLite file in the
prediction log's folder, shared by every HTTP process (WAL: one writer at a time, readers never
wait), so that feedback reaches a prediction whichever process answered it.

Each process's log writer adds its predictions in one transaction per batch of lines
(serving/prediction_log.py); POST /feedback sets a prediction's `truth` once. A prediction takes
feedback for `--feedback-days` days, and the file holds at most MAX_PREDICTIONS of them (the oldest
go first): older IDs are unknown, as if they never were. Live accuracy is counted here, exactly,
over the feedback received for the predictions inside the window.
"""
import sqlite3
import time
from pathlib import Path

FILE = "feedback.sqlite3"
MAX_PREDICTIONS = 2_000_000  # about 200 MB: a week at 3 predictions a second, or the last 2 million
BUSY_SECONDS = 5.0  # another process's transaction is waited for this long, then the attempt fails
SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    id TEXT PRIMARY KEY, at REAL NOT NULL, model TEXT NOT NULL, version TEXT NOT NULL,
    label INTEGER NOT NULL, truth INTEGER, told_at REAL);
CREATE INDEX IF NOT EXISTS predictions_at ON predictions (at);
CREATE INDEX IF NOT EXISTS predictions_told ON predictions (model, version) WHERE truth IS NOT NULL;
"""


class UnknownPrediction(Exception):
    """No prediction with that ID is held (never logged, or past the feedback window)."""


class AlreadyTold(Exception):
    """That prediction already has its true label."""


class FeedbackStore:
    """One connection, used by one thread at a time (each caller keeps its own store)."""

    def __init__(self, folder: Path, days: float):
        self.days = days
        self.db = sqlite3.connect(folder / FILE, timeout=BUSY_SECONDS, isolation_level=None,
                                  check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # WAL: a crash may lose the last commits, never corrupts
        self.db.executescript(SCHEMA)

    def add(self, rows: list[tuple]) -> None:
        """(id, at, model, version, label) rows; an ID already held keeps its first prediction."""
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany("INSERT OR IGNORE INTO predictions (id, at, model, version, label) VALUES (?, ?, ?, ?, ?)",
                                rows)

    def tell(self, prediction_id: str, truth: int) -> tuple[str, str, int]:
        """Record the true label of a held prediction: its (model, version, predicted label)."""
        oldest = time.time() - self.days * 86400
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")  # the check and the update in one writer's turn
            row = self.db.execute("SELECT model, version, label, truth FROM predictions WHERE id = ? AND at >= ?",
                                  (prediction_id, oldest)).fetchone()
            if row is None:
                raise UnknownPrediction(prediction_id)
            if row[3] is not None:
                raise AlreadyTold(prediction_id)
            self.db.execute("UPDATE predictions SET truth = ?, told_at = ? WHERE id = ?",
                            (truth, time.time(), prediction_id))
        return row[0], row[1], row[2]

    def prune(self) -> int:
        """Forget predictions past the window, and the oldest beyond MAX_PREDICTIONS: how many went."""
        with self.db:
            self.db.execute("BEGIN")
            gone = self.db.execute("DELETE FROM predictions WHERE at < ?", (time.time() - self.days * 86400,)).rowcount
            excess = self.db.execute("SELECT COUNT(*) FROM predictions").fetchone()[0] - MAX_PREDICTIONS
            if excess > 0:
                gone += self.db.execute("DELETE FROM predictions WHERE id IN (SELECT id FROM predictions ORDER BY at "
                                        "LIMIT ?)", (excess,)).rowcount
        return gone

    def live_accuracy(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(model, version) -> (answers told, of which right), over the predictions in the feedback window
        (older ones wait for the next prune, and no longer count)."""
        rows = self.db.execute("SELECT model, version, COUNT(*), SUM(truth = label) FROM predictions "
                               "WHERE truth IS NOT NULL AND at >= ? GROUP BY model, version",
                               (time.time() - self.days * 86400,))
        return {(model, version): (told, right) for model, version, told, right in rows}

    def close(self) -> None:
        self.db.close()
