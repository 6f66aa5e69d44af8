"""Verdicts kept in sqlite so a rerun never pays twice, and the lookup that asks only for the rest."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path

from pipeline.evaluate.judges.base import JudgeError, JudgeItem, Verdict
from pipeline.evaluate.judges.phrases import RefusalPhraseJudge
from pipeline.evaluate.judges.preset import Preset, preset_verdict
from pipeline.io import sha256_file


def cache_key(
    judge: str, model: str, prompt: str, request: str, response: str, preset: str = "", image_sha256: str = ""
) -> str:
    """sha256 of everything that decides a verdict (JSON-encoded, so no two tuples collide).

    ``preset`` and ``image_sha256`` (the image a judge was shown) join the key only when set, so
    the plain question keeps the keys of caches written before presets existed, and verdicts of
    different presets never mix.
    """
    parts = [judge, model, prompt, request, response]
    if preset:
        parts.append(f"preset:{preset}")
    if image_sha256:
        parts.append(f"image:{image_sha256}")
    blob = json.dumps(parts, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def item_key(judge: str, model: str, preset: Preset, item: JudgeItem) -> str:
    """The cache key of ``item`` put to ``model`` with ``preset``: its image counts when the preset sends it."""
    image = ""
    if preset.images and item.image is not None:
        try:
            image = sha256_file(item.image)
        except OSError as err:
            raise JudgeError(
                f"{item.image}: cannot read the image to send to the judge ({err.strerror or err})"
            ) from None
    return cache_key(judge, model, preset.template, item.request, item.response, preset.name, image)


class JudgeCache:
    """Verdicts in an sqlite file, keyed by :func:`cache_key`.

    Every write is committed at once (autocommit), so a crash keeps every verdict already paid
    for; several connections, in one process or many, may share the file. A connection is used
    from the thread that opened it only (sqlite's default check). A cache written before verdicts
    had ``score`` and ``categories`` gains those columns on opening; its verdicts read as None and ().
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS verdicts ("
                "key TEXT PRIMARY KEY, judge TEXT NOT NULL, refused INTEGER NOT NULL, "
                "harmful INTEGER, raw TEXT NOT NULL, score REAL, categories TEXT)"
            )
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(verdicts)")}
            for column, kind in (("score", "REAL"), ("categories", "TEXT")):
                if column not in columns:
                    self._db.execute(f"ALTER TABLE verdicts ADD COLUMN {column} {kind}")
        except sqlite3.DatabaseError as err:
            raise JudgeError(f"{self.path}: not a usable judge cache ({err})") from err

    def get(self, key: str) -> Verdict | None:
        """The cached verdict for ``key``, marked ``cached=True``, or None."""
        row = self._db.execute(
            "SELECT judge, refused, harmful, raw, score, categories FROM verdicts WHERE key = ?", (key,)
        ).fetchone()
        if row is None:
            return None
        judge, refused, harmful, raw, score, categories = row
        return Verdict(
            refused=bool(refused),
            harmful=None if harmful is None else bool(harmful),
            raw=raw,
            judge=judge,
            cached=True,
            score=score,
            categories=tuple(categories.split(",")) if categories else (),
        )

    def put(self, key: str, verdict: Verdict) -> None:
        """Store ``verdict`` under ``key`` (replacing any earlier one), committed at once."""
        harmful = None if verdict.harmful is None else int(verdict.harmful)
        self._db.execute(
            "INSERT OR REPLACE INTO verdicts (key, judge, refused, harmful, raw, score, categories) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                key,
                verdict.judge,
                int(verdict.refused),
                harmful,
                verdict.raw,
                verdict.score,
                ",".join(verdict.categories),
            ),
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
    """Verdicts from ``cache`` where present; ``judge_missing`` for the rest, each stored as it arrives.

    Items with the same key are asked once and share the verdict: items that differ only in what
    the judge does not look at (an image, for a text-only judge) cost one question.
    """
    keys = [key_of(item) for item in items]
    known: dict[str, Verdict] = {}
    missing: dict[str, JudgeItem] = {}
    for key, item in zip(keys, items, strict=True):
        if key in known or key in missing:
            continue
        hit = cache.get(key) if cache is not None else None
        if hit is None:
            missing[key] = item
        else:
            known[key] = hit
    fresh = judge_missing(list(missing.values()))
    if len(fresh) != len(missing):
        raise JudgeError(f"judge returned {len(fresh)} verdicts for {len(missing)} items")
    known.update(zip(missing, fresh, strict=True))
    return [known[key] for key in keys]


def stored_verdict(
    preset: Preset,
    raw: str,
    item: JudgeItem,
    name: str,
    refusals: RefusalPhraseJudge,
    cache: JudgeCache | None,
    key: str,
) -> Verdict:
    """The verdict for one judge reply, written to the cache at once: a crash later keeps what was paid for."""
    verdict = preset_verdict(preset, raw, item, name, refusals)
    if cache is not None:
        cache.put(key, verdict)
    return verdict
