"""One guarded answer as it is produced: the decision at once, then the response piece by piece.

:meth:`Guard.generate_stream <pipeline.defend.guard.Guard.generate_stream>` runs the check and
returns a :class:`GuardedStream`; iterating it decodes the answer token by token (when the model
answers from the check's session) and hands out each piece as it comes, so a server can send it
before the answer is finished. Once the pieces are out, :meth:`GuardedStream.result` is the same
:class:`~pipeline.defend.decisions.GuardedResponse` that :meth:`Guard.generate` returns, with the
finish reason and the token usage.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from pipeline.defend.decisions import ANSWER, GuardDecision, GuardedResponse
from pipeline.defend.ecso import ECSO
from pipeline.defend.routing import ResponseEnd, response_pieces
from pipeline.defend.usage import TokenUsage, prompt_token_count
from pipeline.models.base import ModelAdapter, Request
from pipeline.models.session import PrefixSession


class GuardedStream:
    """The decision (:attr:`decision`), then the response's pieces by iteration (once); then :meth:`result`.

    ``cancelled`` is asked before each decoded token; once it returns True the answer stops there
    and the result's ``finish_reason`` is ``cancelled``.
    """

    def __init__(
        self,
        *,
        decision: GuardDecision,
        request: Request,
        session: PrefixSession | None,
        max_new_tokens: int,
        adapter: ModelAdapter,
        ecso: ECSO,
        refusal_message: str,
        seconds: dict[str, float],
        started: float,
        cancelled: Callable[[], bool] | None = None,
    ) -> None:
        self.decision = decision
        self._request = request
        self._session = session
        self._adapter = adapter
        self._seconds = seconds
        self._started = started
        self._end = ResponseEnd()
        self._text: list[str] = []
        self._done = False
        self._pieces = response_pieces(
            decision,
            request,
            session,
            max_new_tokens,
            adapter=adapter,
            ecso=ecso,
            refusal_message=refusal_message,
            seconds=seconds,
            end=self._end,
            cancelled=cancelled,
        )

    @property
    def seconds(self) -> dict[str, float]:
        """Seconds of each part so far (``prefix`` and ``check`` once constructed; the rest as they run)."""
        return self._seconds

    def __iter__(self) -> Iterator[str]:
        for piece in self._pieces:
            self._text.append(piece)
            yield piece
        self._done = True

    def close(self) -> None:
        """Stop here (a client that went away): the answer's decoding ends and its time is recorded."""
        self._pieces.close()
        self._done = True

    def result(self) -> GuardedResponse:
        """The whole response, its decision, ECSO's steps, timings, finish reason and usage; after iterating."""
        if not self._done:
            raise RuntimeError("the stream's pieces have not all been read yet")
        if self.decision.action == ANSWER and self._session is not None:
            text = self._session.answer_text()  # decoded at once, as Guard.generate always returned it
            prompt_tokens: int | None = self._session.prompt_tokens
        else:
            text = "".join(self._text)
            prompt_tokens = prompt_token_count(self._adapter, self._request)
        completion_tokens = self._end.completion_tokens
        usage = None
        if prompt_tokens is not None and completion_tokens is not None:
            usage = TokenUsage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
        self._seconds["total"] = time.perf_counter() - self._started
        return GuardedResponse(
            decision=self.decision,
            response=text,
            ecso=self._end.ecso,
            seconds=self._seconds,
            finish_reason=self._end.finish_reason,
            usage=usage,
        )
