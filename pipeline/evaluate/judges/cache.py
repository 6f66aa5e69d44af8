"""Verdicts kept in sqlite so a rerun never pays twice, and the lookup that asks only for the rest."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path

from pipeline.evaluate.judges.base import JudgeError, JudgeItem, Verdict
from pipeline.evaluate.judges.phrases import RefusalPhraseJudge
from pipeline.evaluate.judges.prompt import harm_verdict


def cache_key(judge: str, model: str, prompt: str, request: str, response: str) -> str:
    """sha256 of everything that decides a verdict (JSON-encoded, so no two tuples collide)."""
    blob = json.dumps([judge, model, prompt, request, response], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class JudgeCache:
    """Verdicts in an sqlite file, keyed by :func:`cache_key`.

    Every write is committed at once (autocommit), so a crash keeps every verdict already paid
    for; several connections, in one process or many, may share the file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS verdicts ("
                "key TEXT PRIMARY KEY, judge TEXT NOT NULL, refused INTEGER NOT NULL, "
                "harmful INTEGER, raw TEXT NOT NULL)"
            )
        except sqlite3.DatabaseError as err:
            raise JudgeError(f"{self.path}: not a usable judge cache ({err})") from err

    def get(self, key: str) -> Verdict | None:
        """The cached verdict for ``key``, marked ``cached=True``, or None."""
        row = self._db.execute("SELECT judge, refused, harmful, raw FROM verdicts WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        judge, refused, harmful, raw = row
        return Verdict(
            refused=bool(refused), harmful=None if harmful is None else bool(harmful), raw=raw, judge=judge, cached=True
        )

    def put(self, key: str, verdict: Verdict) -> None:
        """Store ``verdict`` under ``key`` (replacing any earlier one), committed at once."""
        harmful = None if verdict.harmful is None else int(verdict.harmful)
        self._db.execute(
            "INSERT OR REPLACE INTO verdicts (key, judge, refused, harmful, raw) VALUES (?, ?, ?, ?, ?)",
            (key, verdict.judge, int(verdict.refused), harmful, verdict.raw),
        )

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0])

    def close(self) -> None:
        """Close the connection."""
        self._db.close()


def judge_cached(
    items: Sequence[JudgeItem],
    cache: JudgeCache | None,
    key_of: Callable[[JudgeItem], str],
    judge_missing: Callable[[list[JudgeItem]], list[Verdict]],
) -> list[Verdict]:
    """Verdicts from ``cache`` where present; ``judge_missing`` for the rest, each stored as it arrives."""
    verdicts: list[Verdict | None] = [None] * len(items)
    missing: list[int] = []
    for i, item in enumerate(items):
        hit = cache.get(key_of(item)) if cache is not None else None
        if hit is None:
            missing.append(i)
        else:
            verdicts[i] = hit
    fresh = judge_missing([items[i] for i in missing])
    if len(fresh) != len(missing):
        raise JudgeError(f"judge returned {len(fresh)} verdicts for {len(missing)} items")
    for i, verdict in zip(missing, fresh, strict=True):
        verdicts[i] = verdict
    return [v for v in verdicts if v is not None]


def stored_verdict(
    raw: str, item: JudgeItem, name: str, refusals: RefusalPhraseJudge, cache: JudgeCache | None, key: str
) -> Verdict:
    """The verdict for one judge reply, written to the cache at once: a crash later keeps what was paid for."""
    verdict = harm_verdict(raw, item.response, name, refusals)
    if cache is not None:
        cache.put(key, verdict)
    return verdict
