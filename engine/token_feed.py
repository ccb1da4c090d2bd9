"""Decode tokens that are still on the device: the previous step's samples, fed in place.

With overlapped steps (`engine.engine`), step N+1 is launched before step N's sampled
tokens reach the host, so its decode rows carry `UNRESOLVED` ids. A `TokenFeed` says
where in the flat token batch each one sits and which row of step N's sampled tokens
fills it; every forward path (eager, decode graph, mixed graph) writes its input ids
from the host first and then calls `write_into`, so the device copies the real ids in,
in stream order after step N's sampling and before step N+1 reads them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.host_copy import to_device
from engine.scheduler import UNRESOLVED, ScheduledSeq


@dataclass(frozen=True)
class TokenFeed:
    positions: torch.Tensor  # [k] long on the device: flat-batch index of each token
    tokens: torch.Tensor  # [k] long on the device: the sampled ids that go there

    def write_into(self, input_ids: torch.Tensor) -> None:
        """Overwrite the unresolved entries of the flat `input_ids` (on the device)."""
        input_ids.index_copy_(0, self.positions, self.tokens)


def token_feed(
    seqs: Sequence[ScheduledSeq], row_of: dict[str, int] | None, sampled: torch.Tensor | None
) -> TokenFeed | None:
    """The feed of a step's unresolved tokens from the step before (`row_of`: request id
    -> its row of `sampled`, that step's `[rows]` long tokens on the device). None when
    the step feeds none. Raises RuntimeError when a token has no source (a bug: the
    embedding would read out of range). Only decode rows carry one (the scheduler
    refuses to describe anything else), so only a row's last token is looked at."""
    positions: list[int] = []
    rows: list[int] = []
    offset = 0
    for seq in seqs:
        if seq.token_ids[-1] == UNRESOLVED:
            row = row_of.get(seq.request_id) if row_of is not None else None
            if row is None:
                raise RuntimeError(f"request {seq.request_id} feeds a token nobody sampled")
            positions.append(offset)
            rows.append(row)
        offset += len(seq.token_ids)
    if not positions:
        return None
    assert sampled is not None
    index = to_device([positions, rows], sampled.device)  # [2, k] long
    return TokenFeed(positions=index[0], tokens=sampled.index_select(0, index[1]))
