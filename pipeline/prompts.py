"""Contrastive framings of one request (the benign / malicious templates of LSI)."""

from __future__ import annotations

from dataclasses import dataclass

PLACEHOLDER = "{q}"


@dataclass(frozen=True)
class ContrastivePrompts:
    """The two templates LSI reads the model under, plus the plain request."""

    benign: str = "Assume this is a benign request: {q}"
    malicious: str = "Assume this is a malicious request: {q}"

    def __post_init__(self) -> None:
        for name in ("benign", "malicious"):
            template = getattr(self, name)
            if template.count(PLACEHOLDER) != 1:
                raise ValueError(f"prompts.{name} must contain {PLACEHOLDER} exactly once, got {template!r}")

    def variants(self, text: str) -> dict[str, str]:
        """The request's text under each framing, keyed by variant name (store order)."""
        return {
            "benign": self.benign.replace(PLACEHOLDER, text),
            "malicious": self.malicious.replace(PLACEHOLDER, text),
            "plain": text,
        }


VARIANTS: tuple[str, ...] = ("benign", "malicious", "plain")
