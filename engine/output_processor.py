"""Turns one request's sampled tokens into streamed text: detokenization, EOS, stop
strings, token limits. Runs on the engine loop's thread, once per sampled token."""

from __future__ import annotations

from collections.abc import Callable

from engine.detokenizer import IncrementalDetokenizer
from engine.request import EngineRequest, FinishReason, RequestOutput
from engine.stop import StopMatcher
from engine.tokenizer import Tokenizer


class RequestStream:
    def __init__(
        self,
        request: EngineRequest,
        tokenizer: Tokenizer,
        emit: Callable[[RequestOutput], None],
    ) -> None:
        self.request = request
        self._emit = emit
        self._eos = frozenset(tokenizer.eos_token_ids)
        self._detokenizer = IncrementalDetokenizer(tokenizer, list(request.prompt_token_ids))
        self._stop = StopMatcher(request.params.stop)
        self.num_generated = 0
        self.finished = False

    def on_token(self, token: int) -> FinishReason | None:
        """Streams the token's text; returns a finish reason when the request is done."""
        self.num_generated += 1
        if token in self._eos and not self.request.params.ignore_eos:
            self._finish(FinishReason.STOP, (token,), self._flush())
            return FinishReason.STOP
        text, stopped = self._stop.push(self._detokenizer.push(token))
        if stopped:
            self._finish(FinishReason.STOP, (token,), text)
            return FinishReason.STOP
        if self.num_generated >= self.request.params.max_new_tokens:
            self._finish(FinishReason.LENGTH, (token,), text + self._flush())
            return FinishReason.LENGTH
        # text may be "" while held back (an incomplete character, a possible stop string)
        self._emit(RequestOutput(text=text, token_ids=(token,)))
        return None

    def abort(self, reason: FinishReason, error: str = "") -> None:
        """Ends the stream without more tokens (cancelled, evicted adapter, engine error)."""
        if not self.finished:
            self._finish(reason, (), "", error)

    def _flush(self) -> str:
        text, _ = self._stop.push(self._detokenizer.flush())
        return text + self._stop.flush()

    def _finish(
        self, reason: FinishReason, token_ids: tuple[int, ...], text: str, error: str = ""
    ) -> None:
        self.finished = True
        self._emit(
            RequestOutput(
                text=text,
                token_ids=token_ids,
                finish_reason=reason,
                prompt_tokens=len(self.request.prompt_token_ids),
                completion_tokens=self.num_generated,
                error=error,
            )
        )
