"""How a prompt's hidden states become one vector per block (``extract.pooling``), and what each is called.

- ``last``: the state at the prompt's last token (the newline after the assistant header), as
  the method reads it.
- ``mean``: the average of the states over the request's own tokens: the tokens that carry a
  character of the user's text (for the embedded model also of the text its OCR found in the
  image), never the chat template's, the framing's, or a VLM's image tokens.
- ``both``: the two side by side.

A store holds each read of each framing as its own entry of the framings axis: ``benign``,
``malicious``, ``plain`` for last-token reads, ``benign_mean``, ... for mean reads
(:func:`pooled_variants`). A detector reads the pooled *features* of a framing: its one read, or
under ``both`` the last-token and mean states concatenated along the feature axis.
"""

from __future__ import annotations

from collections.abc import Sequence

LAST, MEAN = "last", "mean"
READS: tuple[str, ...] = (LAST, MEAN)  # what one forward can read from a prompt's states
POOLINGS: tuple[str, ...] = (LAST, MEAN, "both")  # extract.pooling
MEAN_SUFFIX = "_mean"  # a framing's mean read in the store: "benign" -> "benign_mean"


def pooling_reads(pooling: str) -> tuple[str, ...]:
    """The reads ``pooling`` takes from every prompt, in feature order: ``both`` is last, then mean."""
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; expected one of {list(POOLINGS)}")
    return READS if pooling == "both" else (pooling,)


def read_name(variant: str, read: str) -> str:
    """The store's name for framing ``variant`` read by ``read``."""
    if read not in READS:
        raise ValueError(f"unknown read {read!r}; expected one of {list(READS)}")
    return variant if read == LAST else variant + MEAN_SUFFIX


def pooled_variants(variants: Sequence[str], pooling: str) -> tuple[str, ...]:
    """The framings axis of states read under ``pooling``: every variant for the first read, then the next."""
    return tuple(read_name(variant, read) for read in pooling_reads(pooling) for variant in variants)
