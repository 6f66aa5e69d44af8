"""requirements.lock agrees with pyproject.toml, and the environment the tests run in is the lock's.

scripts/lock.sh writes the lock (pip-compile, with hashes); scripts/bootstrap.sh installs it with
``--require-hashes --no-deps``. torch is not in the lock (the local CPU build is installed on its
own, pinned), nor is the project itself. Set ``LSI_GUARD_SKIP_LOCK_CHECK=1`` to skip the
installed-versions check in an environment deliberately not installed from the lock.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version

from tests.paths import PROJECT_ROOT

LOCK = PROJECT_ROOT / "requirements.lock"
PYPROJECT = PROJECT_ROOT / "pyproject.toml"
NOT_LOCKED = {canonicalize_name("torch")}  # installed on its own by scripts/bootstrap.sh (see scripts/lock.sh)
SKIP_ENV = "LSI_GUARD_SKIP_LOCK_CHECK"

PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==(?P<version>[^\s;\\]+)")
HASH = re.compile(r"--hash=sha256:[0-9a-f]{64}")


@dataclass(frozen=True)
class LockEntry:
    """One requirement of the lock: its pinned version and how many file hashes it carries."""

    name: NormalizedName
    version: str
    hashes: int
    line: int


def read_lock(path: Path) -> tuple[dict[NormalizedName, LockEntry], list[str]]:
    """The lock's pins by normalised name, and every requirement line that is not a ``name==version`` pin.

    A requirement starts at a line that is neither indented nor a comment; its ``--hash`` options
    follow on continuation lines.
    """
    entries: dict[NormalizedName, LockEntry] = {}
    unpinned: list[str] = []
    current: tuple[NormalizedName, str, int] | None = None
    hashes = 0

    def close() -> None:
        if current is not None:
            name, pinned, line = current
            entries[name] = LockEntry(name, pinned, hashes, line)

    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0].isspace():
            hashes += len(HASH.findall(line))
            continue
        close()
        match = PIN.match(line)
        if match is None:
            current = None
            unpinned.append(f"line {number}: {line.strip()}")
            continue
        current, hashes = (canonicalize_name(match["name"]), match["version"], number), len(HASH.findall(line))
    close()
    return entries, unpinned


def pyproject_requirements() -> list[tuple[str, Requirement]]:
    """Every requirement pyproject.toml names, with where (core or the extra), the project's self-reference left out."""
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    found = [("dependencies", Requirement(line)) for line in project["dependencies"]]
    for extra, lines in project.get("optional-dependencies", {}).items():
        found += [(f"extra {extra}", Requirement(line)) for line in lines]
    return [(where, req) for where, req in found if canonicalize_name(req.name) != canonicalize_name(project["name"])]


def test_the_lock_pins_every_requirement_within_pyproject_s_range() -> None:
    entries, _ = read_lock(LOCK)
    wrong = []
    for where, req in pyproject_requirements():
        name = canonicalize_name(req.name)
        if name in NOT_LOCKED:
            continue
        entry = entries.get(name)
        if entry is None:
            wrong.append(f"{req} ({where}) is not in {LOCK.name}; run bash scripts/lock.sh")
        elif not req.specifier.contains(Version(entry.version), prereleases=True):
            wrong.append(f"{req} ({where}): {LOCK.name} pins {entry.version}; run bash scripts/lock.sh")
    assert not wrong, "\n".join(wrong)


def test_every_lock_entry_is_a_hashed_pin() -> None:
    """pip --require-hashes refuses a lock with one unpinned or unhashed line, so the test does too."""
    entries, unpinned = read_lock(LOCK)
    assert not unpinned, f"{LOCK.name} has requirements that are not name==version pins: {unpinned}"
    unhashed = [f"{entry.name}=={entry.version} (line {entry.line})" for entry in entries.values() if not entry.hashes]
    assert not unhashed, f"{LOCK.name} entries without --hash: {unhashed}"
    assert not NOT_LOCKED & set(entries), f"{sorted(NOT_LOCKED)} must stay out of {LOCK.name} (see scripts/lock.sh)"


def test_the_installed_environment_is_the_lock_s() -> None:
    """What pip installed matches the lock, version for version (CI's "pip freeze against the lock")."""
    if os.environ.get(SKIP_ENV) == "1":
        pytest.skip(f"{SKIP_ENV}=1: this environment was not installed from {LOCK.name}")
    entries, _ = read_lock(LOCK)
    wrong = []
    for entry in entries.values():
        try:
            installed = version(entry.name)
        except PackageNotFoundError:
            wrong.append(f"{entry.name}: not installed, {LOCK.name} pins {entry.version}")
            continue
        if Version(installed) != Version(entry.version):
            wrong.append(f"{entry.name}: {installed} installed, {LOCK.name} pins {entry.version}")
    assert not wrong, "reinstall with: source scripts/bootstrap.sh\n" + "\n".join(wrong)


def test_the_lock_reader_finds_pins_hashes_and_stray_lines(tmp_path: Path) -> None:
    lock = tmp_path / "requirements.lock"
    digest = "0" * 64
    lock.write_text(
        "# a comment\n"
        f"Foo_Bar[extra]==1.2.3 \\\n    --hash=sha256:{digest} \\\n    --hash=sha256:{'1' * 64}\n    # via x\n"
        "baz==2.0\n"
        "lsi-guard @ file:///somewhere\n    # via lsi-guard (pyproject.toml)\n",
        encoding="utf-8",
    )
    entries, unpinned = read_lock(lock)
    assert entries == {
        "foo-bar": LockEntry(canonicalize_name("foo-bar"), "1.2.3", 2, 2),
        "baz": LockEntry(canonicalize_name("baz"), "2.0", 0, 6),
    }
    assert unpinned == ["line 7: lsi-guard @ file:///somewhere"]
