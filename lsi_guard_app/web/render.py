"""What the demo page shows: the guard's decision, ECSO's steps and the attribution maps, rendered.

Pure functions from a :class:`~pipeline.defend.decisions.GuardedResponse` (or its parts) to HTML and
text, and from an attribution to figure files; nothing here knows about gradio.
"""

from __future__ import annotations

import html
from pathlib import Path

from pipeline.defend.decisions import ANSWER, REFUSE, GuardDecision, GuardedResponse
from pipeline.defend.ecso import ECSORecord
from pipeline.explain.attribution import Attribution

# Colours of the decision banner: (text, background).
_COLOURS = {REFUSE: ("#991b1b", "#fee2e2"), ANSWER: ("#166534", "#dcfce7"), "ecso": ("#92400e", "#fef3c7")}
_ERROR_COLOURS = ("#7f1d1d", "#fef2f2")
# gr.HTML does not apply the theme's fonts; its CSS variables carry them.
_FONT = "font-family:var(--font, sans-serif)"
_MONO = "font-family:var(--font-mono, monospace)"
# The theme's bundled semi-bold face draws some capitals ("A", "B") from a fallback font: big bold
# headlines use the system's sans-serif instead.
_HEADLINE_FONT = "font-family:system-ui, sans-serif"

PLACEHOLDER_HTML = (
    '<div style="padding:18px;border:1px dashed #9ca3af;border-radius:10px;color:#4b5563;font-size:1.05em">'
    "Type a request (an image is optional) and press <b>Check and answer</b>. "
    "The guard's decision appears here.</div>"
)


def headline(response: GuardedResponse) -> str:
    """The decision in a few words: "Refused", "Answered", or "Sent to ECSO: ..." with ECSO's outcome."""
    decision = response.decision
    if decision.action == REFUSE:
        return "Refused"
    if decision.action == ANSWER:
        return "Answered"
    record = response.ecso
    if record is None:
        return "Sent to ECSO"
    if record.judged_harmful:
        return "Sent to ECSO: judged harmful, answered again without the image"
    return "Sent to ECSO: judged safe, first answer kept"


def score_summary(decision: GuardDecision) -> str:
    """The probe's score against tau in numbers, or why there is no score."""
    if decision.score is None:
        if decision.error is not None:
            return f"no probe score: the check failed (tau {decision.tau:.4f})"
        return f"no probe score: the ECSO policy does not use the probe (tau {decision.tau:.4f})"
    relation = ">" if decision.score > decision.tau else "<="
    return f"LSI refusal score {decision.score:.4f} {relation} tau {decision.tau:.4f}"


def timing_summary(seconds: dict[str, float], explain_seconds: float | None = None) -> str:
    """Where the time went, e.g. ``0.84 s in all (prefix 0.10 s, check 0.05 s, answer 0.69 s)``."""
    parts = [f"{name} {value:.2f} s" for name, value in seconds.items() if name != "total"]
    total = seconds.get("total")
    text = f"{total:.2f} s in all" if total is not None else "time not recorded"
    if parts:
        text += f" ({', '.join(parts)})"
    if explain_seconds is not None:
        text += f"; attribution {explain_seconds:.2f} s"
    return text


def score_bar_html(score: float | None, tau: float, margin: float = 0.0) -> str:
    """A horizontal 0-1 bar: filled up to the score (red above tau, green at or below), a black tick at tau.

    A positive ``margin`` shades the band around tau that the ``lsi_then_ecso`` policy sends to ECSO.
    """
    tau_pct = 100.0 * min(max(tau, 0.0), 1.0)
    layers = []
    if margin > 0:
        lo, hi = max(tau - margin, 0.0), min(tau + margin, 1.0)
        layers.append(
            f'<div title="ECSO band" style="position:absolute;left:{100 * lo:.2f}%;width:{100 * (hi - lo):.2f}%;'
            'top:0;bottom:0;background:repeating-linear-gradient(45deg,#fcd34d55 0 4px,#fde68a99 4px 8px)"></div>'
        )
    if score is not None:
        colour = "#dc2626" if score > tau else "#16a34a"
        layers.append(
            f'<div style="position:absolute;left:0;top:3px;bottom:3px;width:{100 * min(max(score, 0.0), 1.0):.2f}%;'
            f'background:{colour};border-radius:6px"></div>'
        )
    layers.append(
        f'<div title="tau" style="position:absolute;left:calc({tau_pct:.2f}% - 1px);top:-5px;bottom:-5px;'
        'width:3px;background:#111827"></div>'
    )
    scale = (
        '<div style="position:relative;height:16px;font-size:0.8em;color:#4b5563;margin-top:4px">'
        '<span style="position:absolute;left:0">0</span>'
        f'<span style="position:absolute;left:{tau_pct:.2f}%;transform:translateX(-50%)">tau {tau:.3f}</span>'
        '<span style="position:absolute;right:0">1</span></div>'
    )
    bar = (
        '<div style="position:relative;height:22px;background:#e5e7eb;border-radius:8px;margin-top:10px">'
        + "".join(layers)
        + "</div>"
    )
    return f'<div class="score-bar">{bar}{scale}</div>'


def decision_html(response: GuardedResponse, margin: float = 0.0, explain_seconds: float | None = None) -> str:
    """The decision panel: big headline, score against tau (numbers and bar), reason, check error, time."""
    decision = response.decision
    text_colour, background = _COLOURS.get(decision.action, _COLOURS["ecso"])
    # Without a score (ECSO policy, failed check) a bar would only show tau: leave it out.
    bar = score_bar_html(decision.score, decision.tau, margin) if decision.score is not None else ""
    error = ""
    if decision.error is not None:
        error = (
            f'<div style="margin-top:8px;color:#7f1d1d"><b>The check failed:</b> {html.escape(decision.error)}</div>'
        )
    return (
        f'<div class="decision" style="{_FONT};padding:16px 18px;border-radius:10px;'
        f'background:{background};color:#111827">'
        f'<div class="headline" style="{_HEADLINE_FONT};font-size:2em;font-weight:700;line-height:1.2;'
        f'color:{text_colour}">'
        f"{html.escape(headline(response))}</div>"
        f'<div class="score" style="margin-top:8px;font-size:1.1em;{_MONO}">'
        f"{html.escape(score_summary(decision))}</div>"
        f"{bar}"
        f'<div class="reason" style="margin-top:10px"><b>Reason:</b> {html.escape(decision.reason)}</div>'
        f"{error}"
        f'<div class="timing" style="margin-top:6px;color:#374151"><b>Time:</b> '
        f"{html.escape(timing_summary(response.seconds, explain_seconds))}</div>"
        "</div>"
    )


def error_html(message: str) -> str:
    """A clear, readable error in place of the decision."""
    text_colour, background = _ERROR_COLOURS
    return (
        f'<div class="decision error" style="{_FONT};padding:16px 18px;border-radius:10px;background:{background};'
        f'border:1px solid #fca5a5;color:#111827">'
        f'<div class="headline" style="{_HEADLINE_FONT};font-size:1.6em;font-weight:700;color:{text_colour}">'
        "Cannot check this request</div>"
        f'<div style="margin-top:8px;font-size:1.05em">{html.escape(message)}</div></div>'
    )


def ecso_steps(record: ECSORecord) -> list[tuple[str, str]]:
    """ECSO's four steps as (title, what the step produced), in order, skipped steps saying why."""
    verdict = "harmful" if record.judged_harmful else "not harmful"
    if record.caption is not None:
        caption = record.caption
    elif not record.judged_harmful:
        caption = "(skipped: the answer was judged not harmful)"
    else:
        caption = "(skipped: the request has no image)"
    if record.judged_harmful:
        final_title = "4. Final answer, from the caption alone (the image is not shown to the model)"
        final = record.final_answer
    else:
        final_title = "4. Final answer"
        final = f"{record.final_answer}\n(the first answer, kept)"
    return [
        ("1. First answer (the model sees the image, if there is one)", record.answer),
        (f"2. Harm check: {verdict}", f"model's verdict: {record.harm_check_raw}"),
        ("3. Caption of the image, guided by the request", caption),
        (final_title, final),
    ]


def ecso_html(record: ECSORecord) -> str:
    """ECSO's steps as a readable list; model output is escaped and keeps its line breaks."""
    items = "".join(
        '<li style="margin-bottom:10px">'
        f"<b>{html.escape(title)}</b>"
        f'<div style="white-space:pre-wrap;{_MONO};background:#f3f4f6;color:#111827;'
        f'padding:6px 8px;border-radius:6px;margin-top:4px">{html.escape(body) or "(empty)"}</div></li>'
        for title, body in ecso_steps(record)
    )
    changed = "changed the answer" if record.changed else "left the answer unchanged"
    return (
        f'<div class="ecso-steps" style="{_FONT};padding:12px 16px;border:1px solid #fcd34d;border-radius:10px">'
        f'<div style="font-size:1.2em;font-weight:600;margin-bottom:8px">ECSO steps (ECSO {changed})</div>'
        f'<ol style="list-style:none;padding-left:0;margin:0">{items}</ol></div>'
    )


def short_title(text: str, limit: int = 70) -> str:
    """A figure title naming the request, cut to ``limit`` characters with "..." when longer."""
    return f"request: {text if len(text) <= limit else text[: limit - 3] + '...'}"


def draw_attribution_maps(
    attribution: Attribution, text: str, image: str | None, token_map: Path, image_map: Path | None
) -> None:
    """The token heatmap into ``token_map`` and, with an image, the image map into ``image_map`` (PNG files)."""
    from pipeline.explain.plots import plot_image_map, plot_token_heatmap  # matplotlib: only when asked

    title = short_title(text)
    plot_token_heatmap(attribution, token_map, title=title)
    if image is not None and image_map is not None:
        plot_image_map(attribution, Path(image), image_map, title=title)
