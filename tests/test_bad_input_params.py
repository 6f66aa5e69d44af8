"""Bad-input matrix, params surface: broken ``params.yaml`` content is refused by section.key, nothing written."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_params
from tests.snapshots import file_digest


@dataclass(frozen=True)
class BadParams:
    """One broken ``params.yaml``: its text and a pattern the error must match after the file name."""

    id: str
    yaml: str
    expect: str


CASES = [
    BadParams(
        "text-for-a-number",
        "limits:\n  max_request_chars: lots\n",
        r"limits\.max_request_chars: expected a whole number >= 1, got 'lots' \(str\)",
    ),
    BadParams(
        "zero-pixel-limit",
        "limits:\n  max_image_pixels: 0\n",
        r"limits\.max_image_pixels: expected a whole number >= 1, got 0",
    ),
    BadParams(
        "negative-timeout",
        "limits:\n  request_timeout_s: -1\n",
        r"limits\.request_timeout_s: expected a finite number > 0, got -1",
    ),
    BadParams(
        "nan-timeout",
        "limits:\n  request_timeout_s: .nan\n",
        r"limits\.request_timeout_s: expected a finite number > 0, got nan",
    ),
    BadParams(
        "fractional-token-limit",
        "limits:\n  max_request_tokens: 2048.5\n",
        r"limits\.max_request_tokens: expected a whole number >= 1, got 2048\.5 \(float\)",
    ),
    BadParams(
        "bool-for-a-number",
        "limits:\n  max_request_chars: true\n",
        r"limits\.max_request_chars: expected a whole number >= 1, got True \(bool\)",
    ),
    BadParams(
        "unknown-key",
        "limits:\n  max_request_char: 100\n",
        r"unknown key\(s\) \['max_request_char'\] in params section 'limits'; known: \[.*'max_request_chars'",
    ),
    BadParams(
        "unknown-section",
        "limit:\n  max_request_chars: 100\n",
        r"unknown params section\(s\) \['limit'\]; known: \[.*'limits'",
    ),
    BadParams(
        "section-not-a-mapping", "limits: [1, 2]\n", r"limits: expected a mapping of settings, got \[1, 2\] \(list\)"
    ),
    BadParams(
        "splits-not-summing-to-one",
        "prepare:\n  splits: {train: 0.5, val: 0.2, calib: 0.2, test: 0.2}\n",
        r"prepare\.splits: expected fractions summing to 1",
    ),
    BadParams(
        "misnamed-split",
        "prepare:\n  splits: {train: 0.5, valid: 0.15, calib: 0.15, test: 0.2}\n",
        r"prepare\.splits: expected exactly the splits \['train', 'val', 'calib', 'test'\], got \[.*'valid'",
    ),
    BadParams(
        "negative-layer", "train:\n  fusion_layer: -2\n", r"train\.fusion_layer: expected a stored block index .*got -2"
    ),
    BadParams(
        "layer-not-extracted", "train:\n  fusion_layer: 40\n", r"train\.fusion_layer=40 is not among extract\.layers"
    ),
    BadParams(
        "yes-as-bool", "train:\n  standardize: yes\n", r"train\.standardize: expected true or false, got 'yes' \(str\)"
    ),
    BadParams(
        "repeated-layer",
        "extract:\n  layers: [3, 3]\n",
        r"extract\.layers: expected a list of one or more distinct whole numbers",
    ),
    BadParams(
        "unknown-choice",
        "guard:\n  on_error: ignore\n",
        r"guard\.on_error: expected one of \['refuse', 'answer'\], got 'ignore'",
    ),
    BadParams(
        "duplicate-key",
        "limits:\n  max_request_chars: 10\n  max_request_chars: 20\n",
        r"not valid YAML: .*duplicate key \"max_request_chars\"",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_params_are_refused_by_key_and_leave_outputs_alone(tmp_path: Path, case: BadParams) -> None:
    earlier = tmp_path / "data" / "prepared" / "summary.json"
    earlier.parent.mkdir(parents=True)
    earlier.write_text('{"rows": 3}\n')
    before = file_digest(earlier)
    params = tmp_path / "params.yaml"
    params.write_text(case.yaml)
    with pytest.raises(ConfigError) as info:
        load_params(params)
    assert re.search(rf"^{re.escape(str(params))}: {case.expect}", str(info.value), re.DOTALL), str(info.value)
    assert file_digest(earlier) == before
    assert sorted(p.name for p in earlier.parent.iterdir()) == ["summary.json"]
