"""The pieces of state a linear detector reads, and the getter that fetches them."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import VARIANTS
from pipeline.detect.pieces import Piece, getter_from_states, piece_inputs

LAYERS = (1, 3)


def _states(n: int = 4, hidden: int = 6, seed: int = 0) -> np.ndarray:
    """Random states ``(n, framings, layers, hidden)``."""
    return np.random.default_rng(seed).normal(size=(n, len(VARIANTS), len(LAYERS), hidden)).astype(np.float32)


def test_a_piece_parses_from_its_label_and_refuses_unknown_parts() -> None:
    assert Piece.parse("delta@3") == Piece("delta", 3)
    assert Piece.parse(Piece("plain", 9).label()) == Piece("plain", 9)
    with pytest.raises(ValueError, match="like 'plain@9'"):
        Piece.parse("plain")
    with pytest.raises(ValueError, match="unknown state part"):
        Piece.parse("image@2")


def test_delta_is_malicious_minus_benign_and_variants_name_the_framing_axis() -> None:
    states = _states()
    get = getter_from_states(states, LAYERS)
    expected = states[:, VARIANTS.index("malicious"), 1] - states[:, VARIANTS.index("benign"), 1]
    np.testing.assert_allclose(get("delta", 3).numpy(), expected)
    only_plain = getter_from_states(states[:, [VARIANTS.index("plain")]], LAYERS, ("plain",))
    np.testing.assert_array_equal(only_plain("plain", 1).numpy(), states[:, VARIANTS.index("plain"), 0])


def test_piece_inputs_puts_the_pieces_side_by_side_in_order() -> None:
    states = _states()
    get = getter_from_states(states, LAYERS)
    inputs = piece_inputs([Piece("benign", 1), Piece("plain", 3)], get).numpy()
    assert inputs.shape == (4, 12)
    np.testing.assert_array_equal(inputs[:, :6], states[:, VARIANTS.index("benign"), 0])
    np.testing.assert_array_equal(inputs[:, 6:], states[:, VARIANTS.index("plain"), 1])
