"""Sampling parameters and the batched sampler that turns logits into next tokens.

Every row of a batch samples with its own parameters and its own `torch.Generator`,
so a request's tokens depend only on its logits, its parameters and its generator's
state, never on which other requests share the batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from engine.stop import validate_stop_strings

MAX_TEMPERATURE = 100.0
# Below this, dividing logits by the temperature overflows float32 or makes the
# distribution one-hot anyway; such rows are sampled greedily (as vLLM does).
GREEDY_TEMPERATURE = 1e-5
MAX_SEED = 2**64 - 1
# Top-p-only rows look for their nucleus among this many best tokens before sorting
# the whole vocabulary: on a CPU, topk(1024) of a 49k-128k vocabulary costs about a
# millisecond, a full sort tens of milliseconds.
NUCLEUS_CANDIDATES = 1024
DEFAULT_MAX_NEW_TOKENS = 256


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens.

    temperature 0 means greedy; top_p 0 (the proto3 default) means 1.0, i.e. off, and is
    stored as 1.0; top_k 0 means off; seed None means a random seed. Construction does
    not check ranges: call `validate` on anything that came from a user.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    stop: tuple[str, ...] = field(default=())
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.top_p == 0:
            object.__setattr__(self, "top_p", 1.0)
        object.__setattr__(self, "stop", tuple(self.stop))

    @property
    def is_greedy(self) -> bool:
        """Argmax decoding: temperature ~0, or top_k 1 (the same thing by definition)."""
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    def validate(self, max_model_len: int | None = None) -> None:
        """Raise ValueError with a sentence for the caller if any value is out of range.

        With `max_model_len`, max_new_tokens may not exceed the model's context window.
        """
        t = self.temperature
        if not math.isfinite(t) or t < 0 or t > MAX_TEMPERATURE:
            raise ValueError(
                f"temperature is {t}; it must be between 0 (greedy) and {MAX_TEMPERATURE}"
            )
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p is {self.top_p}; it must be in (0, 1] (0 or 1 turns it off)")
        if self.top_k < 0:
            raise ValueError(f"top_k is {self.top_k}; it must be 0 (off) or positive")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed is {self.seed}; it must be between 0 and 2**64 - 1")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens is {self.max_new_tokens}; it must be at least 1")
        if max_model_len is not None and self.max_new_tokens > max_model_len:
            raise ValueError(
                f"max_new_tokens is {self.max_new_tokens} but the model's context window "
                f"is {max_model_len} tokens; ask for at most {max_model_len}"
            )
        validate_stop_strings(self.stop)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for one request, kept for the request's whole life.

    `seed` None draws a random seed. All 64 bits of a seed matter: it is mixed first,
    because the CPU generator keeps only the low 32 bits of what it is given. A CPU
    generator is cheapest even for a GPU batch: one scalar is drawn per row and step.
    """
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(_splitmix64(seed))
    return generator


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> list[int]:
    """Next token id of every row of `logits`, as host ints (see `sample_tokens`)."""
    return sample_tokens(logits, params, generators).tolist()


def sample_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """Next token id of every row of `logits` ([N, vocab], any float dtype) as an `[N]`
    long tensor on logits' device; launches only, no host synchronisation for greedy rows.

    Greedy rows (temperature ~0 or top_k 1) take the argmax (first index on ties), draw
    no random number and so leave their generator untouched. Other rows:
    logits / temperature, keep the top_k most likely, keep the smallest set whose
    cumulative probability reaches top_p (at least one token), then draw from what is
    left with one uniform from the row's generator (the global RNG if None).
    """
    if not len(params) == len(generators) == logits.shape[0]:
        raise ValueError(
            f"{logits.shape[0]} logits rows, {len(params)} params, {len(generators)} generators"
        )
    greedy = [i for i, p in enumerate(params) if p.is_greedy]
    if len(greedy) == len(params):
        return logits.argmax(dim=-1)  # the common case: one launch, no index copies
    tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    if greedy:
        rows = torch.tensor(greedy, device=logits.device)
        tokens[rows] = logits[rows].argmax(dim=-1)
    # Which path a row takes depends only on its own params, so batch-mates never
    # change a row's result.
    plain = [i for i, p in enumerate(params) if not p.is_greedy and not _filters(p)]
    filtered = [i for i, p in enumerate(params) if not p.is_greedy and _filters(p)]
    for indices, draw in ((plain, _draw_plain), (filtered, _draw_filtered)):
        if indices:
            rows = torch.tensor(indices, device=logits.device)
            uniforms = _uniforms([generators[i] for i in indices], logits.device)
            tokens[rows] = draw(logits[rows].float(), [params[i] for i in indices], uniforms)
    return tokens


def _filters(p: SamplingParams) -> bool:
    return p.top_k > 0 or p.top_p < 1.0


def _draw_plain(
    logits: torch.Tensor, params: list[SamplingParams], uniforms: torch.Tensor
) -> torch.Tensor:
    temperature = _column([p.temperature for p in params], logits)  # [M, 1]
    probs = torch.softmax(logits / temperature, dim=-1)  # [M, vocab] f32
    return _invert_cdf(probs, uniforms)


def _draw_filtered(
    logits: torch.Tensor, params: list[SamplingParams], uniforms: torch.Tensor
) -> torch.Tensor:
    """Top-k rows look only at their k best tokens; top-p-only rows first at the
    NUCLEUS_CANDIDATES best and at the whole (sorted) vocabulary only if their nucleus
    reaches beyond. A row's width depends on its own params alone."""
    vocab = logits.shape[-1]
    tokens = torch.empty(len(params), dtype=torch.long, device=logits.device)
    widths = [min(vocab, p.top_k if p.top_k > 0 else NUCLEUS_CANDIDATES) for p in params]
    for width in sorted(set(widths)):
        group = [i for i, w in enumerate(widths) if w == width]
        rows = torch.tensor(group, device=logits.device)
        picked, covered = _draw_among_best(
            logits[rows], [params[i] for i in group], uniforms[rows], width
        )
        tokens[rows] = picked
        if not bool(covered.all()):
            wide = rows[~covered]
            wide_params = [params[i] for i, c in zip(group, covered.tolist(), strict=True) if not c]
            tokens[wide] = _draw_among_best(logits[wide], wide_params, uniforms[wide], vocab)[0]
    return tokens


def _draw_among_best(
    logits: torch.Tensor, params: list[SamplingParams], uniforms: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample among each row's `width` most likely tokens: ([M] token ids, [M] covered).

    `covered` is False where a top-p-only row's nucleus may extend past the candidates;
    such a row must be drawn again with the whole vocabulary.
    """
    values, ids = _best_candidates(logits, width)  # [M, width], value desc, id asc
    temperature = _column([p.temperature for p in params], logits)
    top_p = _column([p.top_p if p.top_p < 1.0 else math.inf for p in params], logits)
    is_top_k = torch.tensor([p.top_k > 0 for p in params], device=logits.device)
    scaled = values / temperature
    # Top-k renormalizes over the k kept tokens; top-p alone measures mass against the
    # whole vocabulary.
    norm = torch.where(
        is_top_k.unsqueeze(-1),
        torch.logsumexp(scaled, dim=-1, keepdim=True),
        torch.logsumexp(logits / temperature, dim=-1, keepdim=True),
    )
    probs = torch.exp(scaled - norm)  # [M, width] f32, non-increasing per row
    total = probs.sum(dim=-1)
    covered = is_top_k | (total >= top_p.squeeze(-1)) | (width == logits.shape[-1])
    # Keep token i while the mass before it is below top_p: the smallest set reaching
    # top_p, and always the first token.
    mass_before = torch.cumsum(probs, dim=-1) - probs
    probs = probs.masked_fill(mass_before >= top_p, 0.0)
    picked = _invert_cdf(probs, uniforms)  # [M] candidate positions
    return ids.gather(-1, picked.unsqueeze(-1)).squeeze(-1), covered


def _best_candidates(logits: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `width` largest logits per row and their token ids, ordered by value
    descending and, among equal values, by id ascending (as argmax breaks ties)."""
    if width == logits.shape[-1]:
        return torch.sort(logits, dim=-1, descending=True, stable=True)
    values, ids = torch.topk(logits, width, dim=-1)  # tie order unspecified
    ids, by_id = ids.sort(dim=-1)
    values, order = values.gather(-1, by_id).sort(dim=-1, descending=True, stable=True)
    return values, ids.gather(-1, order)


def _invert_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Index of the first token whose cumulative probability exceeds u * total.

    Unnormalized `probs` are fine. A zero-probability token is never picked: its cdf
    equals its predecessor's. Rounding can put u * total at the very top; then the
    last token with probability > 0 is taken.
    """
    cdf = torch.cumsum(probs, dim=-1)  # [M, vocab]
    targets = (uniforms * cdf[:, -1]).unsqueeze(-1)  # [M, 1]
    picked = torch.searchsorted(cdf, targets, right=True).squeeze(-1)
    positions = torch.arange(probs.shape[-1], device=probs.device)
    last_nonzero = torch.where(probs > 0, positions, 0).amax(dim=-1)
    return torch.minimum(picked, last_nonzero)


def _uniforms(generators: list[torch.Generator | None], device: torch.device) -> torch.Tensor:
    # One draw per row from the row's own generator keeps each request's random stream
    # independent of its batch-mates; [M] float32 on `device`.
    draws = [
        torch.rand((), generator=g, device=g.device) if g is not None else torch.rand(())
        for g in generators
    ]
    return torch.stack([d.to(device) for d in draws]).float()


def _column(values: list[float] | list[int], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).unsqueeze(-1)


def _splitmix64(seed: int) -> int:
    z = (seed + 0x9E3779B97F4A7C15) & MAX_SEED
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MAX_SEED
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MAX_SEED
    return z ^ (z >> 31)
