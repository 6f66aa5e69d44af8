"""The cores a worker pool is sized to: the process's CPU affinity, not the machine's count."""

from __future__ import annotations

import os

import pytest

from pipeline.detect.cores import available_cores


def test_available_cores_follow_the_affinity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)
    assert available_cores() == 3


def test_without_an_affinity_call_the_cpu_count_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert available_cores() == 1  # cpu_count() may be None: at least one core
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert available_cores() == 6
