"""Where attributed text sits: token spans, the text each token stands for, OCR lines and words.

Tokens are located by character offsets in the prompt each adapter renders itself, so the
token ids, and therefore the signal, are exactly those of the adapter's own forward pass. An OCR
word's score is the sum over the tokens that start in it, a line's the sum over its tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.models.embedded import IMAGE_CLOSE, IMAGE_OPEN

Span = tuple[int, int]  # [start, stop) in tokens or characters

NO_LINE = -1  # an OCR token (the newline between lines) that belongs to no line
NO_WORD = -1  # an OCR token (a newline, a lone space) that belongs to no word


def overlapping_tokens(offsets: Sequence[tuple[int, int]], start: int, stop: int) -> Span:
    """Token index range ``[first, last + 1)`` of the tokens whose characters overlap ``[start, stop)``.

    Special tokens carry empty ``(0, 0)`` offsets and never overlap.
    """
    hits = [i for i, (s, e) in enumerate(offsets) if e > s and s < stop and e > start]
    if not hits:
        raise ValueError(f"no token covers characters [{start}, {stop})")
    if hits != list(range(hits[0], hits[-1] + 1)):
        raise ValueError(f"tokens covering characters [{start}, {stop}) are not contiguous")
    return hits[0], hits[-1] + 1


def token_pieces(text: str, offsets: Sequence[tuple[int, int]], start: int, stop: int) -> list[str]:
    """The text each token of a span stands for, clipped to ``[start, stop)``.

    Each piece runs from the previous token's end to its own end, so a space between words goes
    with the word after it (as byte-level BPE spells it) whether or not the tokenizer trims
    offsets, and the pieces join back to ``text[start:stop]``.
    """
    ends = [min(e, stop) for _, e in offsets]
    ends[-1] = stop
    starts = [start] + ends[:-1]
    return [text[a:b] for a, b in zip(starts, ends, strict=True)]


def line_char_ranges(lines: Sequence[str]) -> list[Span]:
    """Character range of each line inside ``"\\n".join(lines)``."""
    ranges: list[Span] = []
    cursor = 0
    for line in lines:
        ranges.append((cursor, cursor + len(line)))
        cursor += len(line) + 1
    return ranges


def assign_lines(pieces: Sequence[str], piece_starts: Sequence[int], ranges: Sequence[Span]) -> list[int]:
    """OCR line of each token: the line holding its first non-blank character, else :data:`NO_LINE`.

    Works for any character ranges: given word ranges it gives each token's word.
    """
    assigned: list[int] = []
    for piece, start in zip(pieces, piece_starts, strict=True):
        stripped = len(piece) - len(piece.lstrip())
        if stripped == len(piece):
            assigned.append(NO_LINE)
            continue
        char = start + stripped
        line = next((i for i, (a, b) in enumerate(ranges) if a <= char < b), NO_LINE)
        assigned.append(line)
    return assigned


def sum_by_line(scores: Sequence[float], lines: Sequence[int], n_lines: int) -> list[float]:
    """Summed token scores per OCR line."""
    totals = [0.0] * n_lines
    for score, line in zip(scores, lines, strict=True):
        if line != NO_LINE:
            totals[line] += float(score)
    return totals


def word_char_ranges(lines: Sequence[Sequence[Span]], line_ranges: Sequence[Span]) -> tuple[list[Span], list[int]]:
    """Character range of every word inside the joined OCR text, and the line it is on.

    ``lines[i]`` holds line ``i``'s word ranges relative to the line's start; ``line_ranges``
    where each line sits in the joined text (:func:`line_char_ranges`).
    """
    ranges: list[Span] = []
    owners: list[int] = []
    for line, (words, (offset, _)) in enumerate(zip(lines, line_ranges, strict=True)):
        for start, stop in words:
            ranges.append((offset + start, offset + stop))
            owners.append(line)
    return ranges, owners


def sum_by_word(
    scores: Sequence[float], pieces: Sequence[str], piece_starts: Sequence[int], word_ranges: Sequence[Span]
) -> tuple[list[float], list[int]]:
    """Summed token scores per OCR word, and each token's word.

    A token counts for the word holding its first non-blank character, so a leading space goes
    with the word after it; tokens of blanks only (newlines) count for no word (:data:`NO_WORD`).
    """
    owners = assign_lines(pieces, piece_starts, word_ranges)
    return sum_by_line(scores, owners, len(word_ranges)), owners


def locate_request(prompt: str, framed: str, offset: int, request: str) -> Span:
    """Character range of ``request`` inside ``prompt``, where the framed text put it.

    ``offset`` is where the request starts inside ``framed``
    (:meth:`~pipeline.config.ContrastivePrompts.request_offset`: after the template's text
    under ``prompts.position: before``, 0 under ``after``). The framed text is the last thing in
    the user turn, so its last occurrence is the right one even when the image's OCR text
    repeats the request (typography attacks do).
    """
    if framed[offset : offset + len(request)] != request:
        raise ValueError(f"the request is not at character {offset} of the framed text {framed!r}")
    at = prompt.rfind(framed)
    if at < 0:
        raise ValueError(f"the chat template changed the framed request text, so it cannot be located: {framed!r}")
    start = at + offset
    return start, start + len(request)


def locate_ocr_text(prompt: str, ocr_text: str) -> Span:
    """Character range of the OCR text inside the embedded model's prompt."""
    block = f"{IMAGE_OPEN}\n{ocr_text}\n{IMAGE_CLOSE}"
    at = prompt.find(block)
    if at < 0:
        raise ValueError("the image's OCR text is not where the embedded adapter puts it")
    start = at + len(IMAGE_OPEN) + 1
    return start, start + len(ocr_text)
