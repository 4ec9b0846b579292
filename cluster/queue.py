"""The farm's render queue: every render's spec, priority and state in one SQLite file on the head.

The file outlives the controller: a restarted controller, or `farm up` after `farm down`, reads it
back and resumes what was queued (renders cut short at a task boundary are queued again; a render
is deterministic, so running it again gives the same image). Order: priority (higher first), then
submit time. No Ray here: the queue is plain data and is tested without a cluster.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

QUEUED, RUNNING, DONE, FAILED, CANCELED = "queued", "running", "done", "failed", "canceled"
FINAL = (DONE, FAILED, CANCELED)

SCHEMA = """
CREATE TABLE IF NOT EXISTS renders (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    spec TEXT NOT NULL,          -- the validated spec with its seed drawn, as JSON
    options TEXT NOT NULL,       -- how to run it (the client's CPU thread count, PNG metadata on/off)
    priority INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL,
    submitted REAL NOT NULL,
    started REAL,
    finished REAL,
    error TEXT NOT NULL DEFAULT '',
    result TEXT NOT NULL DEFAULT '',   -- the PNG's path on the head
    stats TEXT NOT NULL DEFAULT '{}',  -- seconds per stage, model load seconds, workers used
    expired REAL                       -- when its PNG was deleted (older than the farm's result TTL)
)
"""
COLUMNS = {"expired": "REAL"}  # added since the first schema: a queue file written before gets them


class RenderQueue:
    """Renders by id in SQLite; one connection, one lock (the controller calls it from several threads)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.lock = threading.Lock()
        self.db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        with self.lock:
            self.db.execute("PRAGMA journal_mode=WAL")  # a reader (farm ls) never waits for a writer
            self.db.executescript(SCHEMA)
            have = {r[1] for r in self.db.execute("PRAGMA table_info(renders)")}
            for name, kind in COLUMNS.items():
                if name not in have:
                    self.db.execute(f"ALTER TABLE renders ADD COLUMN {name} {kind}")

    def add(self, spec: dict, options: dict, priority: int = 0) -> int:
        with self.lock:
            cur = self.db.execute(
                "INSERT INTO renders (spec, options, priority, state, submitted) VALUES (?, ?, ?, ?, ?)",
                (json.dumps(spec), json.dumps(options), priority, QUEUED, time.time()),
            )
            return int(cur.lastrowid)

    def get(self, render_id: int) -> dict | None:
        with self.lock:
            row = self.db.execute("SELECT * FROM renders WHERE id = ?", (render_id,)).fetchone()
        return _record(row) if row else None

    def list(self, limit: int = 50) -> list[dict]:
        """The newest renders first."""
        with self.lock:
            rows = self.db.execute("SELECT * FROM renders ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [_record(r) for r in rows]

    def next_queued(self) -> dict | None:
        """The render to start next: highest priority, then earliest submitted."""
        with self.lock:
            row = self.db.execute(
                "SELECT * FROM renders WHERE state = ? ORDER BY priority DESC, submitted, id LIMIT 1", (QUEUED,)
            ).fetchone()
        return _record(row) if row else None

    def queued(self) -> list[int]:
        with self.lock:
            return [r[0] for r in self.db.execute("SELECT id FROM renders WHERE state = ? ORDER BY id", (QUEUED,))]

    def update(self, render_id: int, **values) -> None:
        for key in ("stats",):
            if key in values:
                values[key] = json.dumps(values[key])
        columns = ", ".join(f"{k} = ?" for k in values)
        with self.lock:
            self.db.execute(f"UPDATE renders SET {columns} WHERE id = ?", (*values.values(), render_id))

    def requeue_running(self) -> list[int]:
        """Renders left 'running' by a controller that stopped: queued again (they restart from their start)."""
        with self.lock:
            ids = [r[0] for r in self.db.execute("SELECT id FROM renders WHERE state = ?", (RUNNING,))]
            self.db.execute("UPDATE renders SET state = ?, started = NULL WHERE state = ?", (QUEUED, RUNNING))
        return ids

    def expire(self, before: float, now: float) -> list[tuple[int, str]]:
        """Done renders finished before `before` that still have a PNG: marked expired at `now`, result cleared.
        Returns (id, the PNG's path) for each, to delete."""
        with self.lock:
            rows = self.db.execute(
                "SELECT id, result FROM renders WHERE state = ? AND result != '' AND finished < ?", (DONE, before)
            ).fetchall()
            self.db.executemany("UPDATE renders SET result = '', expired = ? WHERE id = ?", [(now, r[0]) for r in rows])
        return [(r[0], r[1]) for r in rows]

    def close(self) -> None:
        with self.lock:
            self.db.close()


def expire_results(queue: RenderQueue, ttl_s: float, now: float) -> list[int]:
    """Delete the PNGs of renders done more than `ttl_s` seconds before `now` (0 = keep them forever); their
    records stay, marked expired. Marked first: a sweep cut short leaves a stray file, never a record whose
    image is gone without saying so. Returns the ids expired."""
    if ttl_s <= 0:
        return []
    expired = queue.expire(now - ttl_s, now)
    for _, path in expired:
        Path(path).unlink(missing_ok=True)
    return [render_id for render_id, _ in expired]


def expired_message(record: dict) -> str:
    """What a client is told about a render whose PNG the farm deleted (farm up --result-ttl)."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record["expired"]))
    return (
        f"render {record['id']} expired: the farm deleted its image at {when}, older than the farm's result "
        "lifetime (`farm up --result-ttl HOURS`, 0 keeps images); render its spec again for a new one"
    )


def _record(row: sqlite3.Row) -> dict:
    record = dict(row)
    for key in ("spec", "options", "stats"):
        record[key] = json.loads(record[key])
    return record
