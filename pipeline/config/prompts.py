"""How text reaches the model: the contrastive framings (section ``prompts``) and token decoding (``ecso.decoding``).

Frozen dataclasses that check every field when built, like the other ``params.yaml`` sections.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config.checks import flag, number, positive, refuse, whole

PLACEHOLDER = "{q}"
PROMPT_POSITIONS: tuple[str, ...] = ("before", "after")  # prompts.position: where the framing goes
AFTER_SEPARATOR = "\n\n"  # prompts.position after: between the request and the framing
VARIANTS: tuple[str, ...] = ("benign", "malicious", "plain")  # store order of the three framings


@dataclass(frozen=True)
class ContrastivePrompts:
    r"""The two templates LSI reads the model under (section ``prompts``), plus the plain request.

    ``position`` says where the framing goes relative to the request:

    - ``before`` (the method's order): the template with ``{q}`` replaced by the request, e.g.
      ``"Assume this is a benign request: <request>"``.
    - ``after``: the request first, then the framing: ``request + "\n\n" + framing``, where
      ``framing`` is the template with ``{q}`` removed, then leading and trailing whitespace
      stripped, then one trailing ``:`` removed and trailing whitespace stripped again
      (:meth:`framing`), e.g. ``"<request>\n\nAssume this is a benign request"``. The three
      framings of a request then start with the same request tokens, which the shared-prefix
      forward computes once. Text around a ``{q}`` in the middle of a template is kept as it is.
    """

    benign: str = "Assume this is a benign request: {q}"
    malicious: str = "Assume this is a malicious request: {q}"
    position: str = "before"

    def __post_init__(self) -> None:
        for name in ("benign", "malicious"):
            template = getattr(self, name)
            if not isinstance(template, str) or template.count(PLACEHOLDER) != 1:
                refuse(f"prompts.{name}", f"text containing {PLACEHOLDER} exactly once", template)
        if not isinstance(self.position, str) or self.position not in PROMPT_POSITIONS:
            refuse("prompts.position", " or ".join(PROMPT_POSITIONS), self.position)
        if self.position == "after":
            for name in ("benign", "malicious"):
                if not self.framing(name):
                    refuse(
                        f"prompts.{name}",
                        f"text besides {PLACEHOLDER} (position after appends it)",
                        getattr(self, name),
                    )

    def framing(self, name: str) -> str:
        """What position ``after`` appends to the request: the template without ``{q}``, stripped, no trailing ``:``."""
        return getattr(self, name).replace(PLACEHOLDER, "").strip().removesuffix(":").rstrip()

    def framed(self, name: str, text: str) -> str:
        """``text`` under the framing ``name`` (``benign``, ``malicious``) at this ``position``; ``plain``: ``text``."""
        if name == "plain":
            return text
        if self.position == "after":
            return text + AFTER_SEPARATOR + self.framing(name)
        return getattr(self, name).replace(PLACEHOLDER, text)

    def request_offset(self, name: str) -> int:
        """Character index at which the request starts in :meth:`framed` text (0 under ``after`` and for ``plain``)."""
        return 0 if self.position == "after" or name == "plain" else getattr(self, name).index(PLACEHOLDER)

    def request_span(self, name: str, text: str) -> tuple[int, int]:
        """Characters ``[start, stop)`` of :meth:`framed` text ``name`` that are the request ``text`` itself."""
        start = self.request_offset(name)
        return start, start + len(text)

    def variants(self, text: str) -> dict[str, str]:
        """The request's text under each framing, keyed by variant name (store order)."""
        return {"benign": self.framed("benign", text), "malicious": self.framed("malicious", text), "plain": text}


@dataclass(frozen=True, kw_only=True)
class Decoding:
    """How new tokens are chosen (section ``ecso.decoding``): greedy by default, or sampled with a fixed seed.

    ``temperature``, ``top_p`` and ``top_k`` (0: off) apply only when ``do_sample`` is true;
    ``repetition_penalty`` (1.0: off) applies either way. Sampling draws under ``seed`` inside a
    forked random state (:func:`pipeline.models.decoding.random_state`), so the same requests and
    settings give the same text and nothing else's randomness is disturbed.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        flag("ecso.decoding.do_sample", self.do_sample)
        positive("ecso.decoding.temperature", self.temperature)
        number("ecso.decoding.top_p", self.top_p, 0.0, 1.0, low_open=True, high_open=False)
        whole("ecso.decoding.top_k", self.top_k)
        positive("ecso.decoding.repetition_penalty", self.repetition_penalty)
        whole("ecso.decoding.seed", self.seed)

    @property
    def greedy(self) -> bool:
        """True when decoding is plain greedy: the same tokens as any other greedy loop."""
        return not self.do_sample and self.repetition_penalty == 1.0


GREEDY = Decoding()
