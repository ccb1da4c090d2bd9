"""Turns one request's sampled tokens into streamed text: detokenization, EOS, stop
strings, token limits. Runs on the engine loop's thread: `accept` right after each step
(cheap: EOS and the token limit), `stream_text` while the GPU runs the next step."""

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
        self._pending: list[int] = []  # accepted, not yet streamed
        self._reason: FinishReason | None = None  # set by accept() on EOS or the limit

    def accept(self, token: int) -> FinishReason | None:
        """Records a sampled token without any text work (the engine loop calls this
        right after the step, so the scheduler learns at once that a request is done).
        Returns STOP on EOS and LENGTH at the token limit; take no tokens after that."""
        self.num_generated += 1
        self._pending.append(token)
        if token in self._eos and not self.request.params.ignore_eos:
            self._reason = FinishReason.STOP
        elif self.num_generated >= self.request.params.max_new_tokens:
            self._reason = FinishReason.LENGTH
        return self._reason

    def stream_text(self) -> FinishReason | None:
        """Detokenizes the accepted tokens and emits their text, one output per token;
        the last output carries the finish. Returns the finish reason once the stream
        has finished, which a stop string can make happen here (one step late)."""
        tokens, self._pending = self._pending, []
        for index, token in enumerate(tokens):
            last = index == len(tokens) - 1
            if last and self._reason is FinishReason.STOP:  # EOS: no text of its own
                self._finish(FinishReason.STOP, (token,), self._flush())
                return FinishReason.STOP
            text, stopped = self._stop.push(self._detokenizer.push(token))
            if stopped:
                self._finish(FinishReason.STOP, (token,), text)
                return FinishReason.STOP
            if last and self._reason is FinishReason.LENGTH:
                self._finish(FinishReason.LENGTH, (token,), text + self._flush())
                return FinishReason.LENGTH
            # text may be "" while held back (an incomplete character, a possible stop string)
            self._emit(RequestOutput(text=text, token_ids=(token,)))
        return None

    def abort(self, reason: FinishReason, error: str = "") -> None:
        """Ends the stream without more tokens (cancelled, evicted adapter, engine error);
        accepted tokens not yet streamed go out first."""
        if not self.finished and self._pending and self.stream_text() is not None:
            return  # they finished the stream themselves
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
