"""Sampling parameters and the batched sampler."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from engine.sampling import SamplingParams, make_generator, sample

VOCAB = 1000


def _logits(rows: int, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=generator) * 3  # [rows, vocab] f32


# --- SamplingParams -----------------------------------------------------------------


def test_defaults_and_normalization() -> None:
    params = SamplingParams(top_p=0.0, stop=["a", "b"])  # type: ignore[arg-type]
    assert params.top_p == 1.0
    assert params.stop == ("a", "b")
    assert params.top_k == 0 and params.seed is None and not params.ignore_eos
    assert SamplingParams(temperature=0.0).is_greedy
    assert not SamplingParams().is_greedy
    params.validate()
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.temperature = 2.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"temperature": -0.1}, "temperature is -0.1"),
        ({"temperature": math.nan}, "temperature is nan"),
        ({"temperature": math.inf}, "temperature is inf"),
        ({"temperature": 100.5}, "between 0 (greedy) and 100"),
        ({"top_p": -0.5}, "top_p is -0.5"),
        ({"top_p": 1.5}, "must be in (0, 1]"),
        ({"top_p": math.nan}, "top_p is nan"),
        ({"top_k": -1}, "top_k is -1"),
        ({"seed": -1}, "seed is -1"),
        ({"seed": 2**64}, "2**64 - 1"),
        ({"max_new_tokens": 0}, "at least 1"),
        ({"stop": ("ok", "")}, "stop string 1 is empty"),
        ({"stop": tuple(str(i) for i in range(17))}, "at most 16"),
    ],
)
def test_validate_refuses_with_a_sentence(changes: dict, words: str) -> None:
    with pytest.raises(ValueError) as info:
        SamplingParams(**changes).validate()
    assert words in str(info.value)


def test_validate_against_context_window() -> None:
    SamplingParams(max_new_tokens=2048, seed=2**64 - 1, temperature=100, top_k=5).validate(
        max_model_len=2048
    )
    with pytest.raises(ValueError, match="context window is 2048 tokens"):
        SamplingParams(max_new_tokens=2049).validate(max_model_len=2048)


# --- sampler ------------------------------------------------------------------------


def test_greedy_is_argmax_with_first_index_on_ties() -> None:
    logits = _logits(4)
    logits[1, 10] = logits[1, 20] = 100.0
    tokens = sample(logits, [SamplingParams(temperature=0.0)] * 4, [None] * 4)
    assert tokens == logits.argmax(dim=-1).tolist()
    assert tokens[1] == 10


@pytest.mark.parametrize("filters", [{"top_k": 1}, {"top_p": 1e-9}, {"top_k": 1, "top_p": 0.5}])
def test_single_token_filters_equal_greedy(filters: dict) -> None:
    logits = _logits(64, seed=1)
    logits[3, 7] = logits[3, 9] = 50.0  # a tie: both must pick the first index
    params = [SamplingParams(temperature=0.7, **filters)] * 64
    generators = [make_generator(i, "cpu") for i in range(64)]
    assert sample(logits, params, generators) == logits.argmax(dim=-1).tolist()


def test_top_k_never_leaves_the_top_k() -> None:
    logits = _logits(1, seed=2).repeat(3000, 1)  # one row, many independent draws
    top2 = set(logits[0].topk(2).indices.tolist())
    params = [SamplingParams(temperature=5.0, top_k=2)] * 3000
    tokens = sample(logits, params, [make_generator(0, "cpu")] * 3000)
    assert set(tokens) == top2


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().repeat(4000, 1)
    params = [SamplingParams(temperature=1.0, top_p=0.75)] * 4000
    tokens = sample(logits, params, [make_generator(1, "cpu")] * 4000)
    assert set(tokens) == {0, 1}
    assert abs(tokens.count(0) / 4000 - 0.5 / 0.8) < 0.03


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_frequencies_follow_the_tempered_distribution(temperature: float) -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, -math.inf])
    draws = 20000
    params = [SamplingParams(temperature=temperature)] * draws
    tokens = sample(logits.repeat(draws, 1), params, [make_generator(3, "cpu")] * draws)
    expected = torch.softmax(logits / temperature, dim=-1).tolist()
    for token, probability in enumerate(expected):
        assert abs(tokens.count(token) / draws - probability) < 0.015
    assert tokens.count(4) == 0  # -inf logits are never drawn


def _run_steps(batch_logits: list[torch.Tensor], row: int, params, seeds) -> list[int]:
    generators = [make_generator(s, "cpu") if s is not None else None for s in seeds]
    return [sample(logits, params, generators)[row] for logits in batch_logits]


@pytest.mark.parametrize(
    "filters", [{}, {"top_k": 50}, {"top_p": 0.9}, {"top_k": 20, "top_p": 0.8}]
)
def test_same_seed_same_tokens_whatever_the_batch(filters: dict) -> None:
    target = SamplingParams(temperature=0.9, seed=42, **filters)
    steps = 20
    alone = [_logits(1, seed=100 + s) for s in range(steps)]
    tokens_alone = _run_steps(alone, 0, [target], [42])
    # The same request's logits at row 2 of a batch with greedy, filtered and unseeded
    # neighbours.
    neighbours = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.3, top_k=3),
        target,
        SamplingParams(temperature=0.5, top_p=0.5),
        SamplingParams(temperature=1.0),
    ]
    batched = []
    for s in range(steps):
        others = _logits(5, seed=900 + s)
        others[2] = alone[s][0]
        batched.append(others)
    tokens_batched = _run_steps(batched, 2, neighbours, [None, 7, 42, 8, None])
    assert tokens_batched == tokens_alone
    tokens_other_seed = _run_steps(alone, 0, [target], [43])
    assert tokens_other_seed != tokens_alone


def test_seeds_use_all_64_bits() -> None:
    low = torch.rand(4, generator=make_generator(1, "cpu"))
    high = torch.rand(4, generator=make_generator(2**32 + 1, "cpu"))
    assert not torch.equal(low, high)
    assert torch.equal(low, torch.rand(4, generator=make_generator(1, "cpu")))


def test_unseeded_generators_differ() -> None:
    first = torch.rand(4, generator=make_generator(None, "cpu"))
    second = torch.rand(4, generator=make_generator(None, "cpu"))
    assert not torch.equal(first, second)


def test_low_precision_logits_and_unseeded_rows() -> None:
    logits = _logits(3).to(torch.bfloat16)
    params = [SamplingParams(temperature=0.0), SamplingParams(), SamplingParams(top_k=5)]
    tokens = sample(logits, params, [None, None, None])
    assert tokens[0] == logits[0].float().argmax().item()
    assert tokens[2] in logits[2].float().topk(5).indices.tolist()
    assert all(0 <= t < VOCAB for t in tokens)


def test_mismatched_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="2 logits rows, 1 params"):
        sample(_logits(2), [SamplingParams()], [None, None])


def _reference_support(logits: torch.Tensor, p: SamplingParams) -> dict[int, float]:
    """Token -> probability after temperature, top-k, top-p: the textbook way."""
    probs = torch.softmax(logits.double() / p.temperature, dim=-1)
    order = torch.sort(probs, descending=True, stable=True).indices.tolist()
    if p.top_k > 0:
        order = order[: p.top_k]
    kept_mass = sum(probs[i].item() for i in order)
    support: dict[int, float] = {}
    mass = 0.0
    for token in order:
        if mass >= p.top_p:
            break
        support[token] = probs[token].item() / kept_mass
        mass += support[token]
    total = sum(support.values())
    return {t: q / total for t, q in support.items()}


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, top_p=0.6),  # nucleus of 1829 tokens: full sort
        SamplingParams(temperature=0.1, top_p=0.9),  # 576 tokens, inside the candidates
        SamplingParams(temperature=0.01, top_p=0.9),  # 58 tokens
        SamplingParams(temperature=2.0, top_k=1500, top_p=0.8),
        SamplingParams(temperature=1.0, top_k=6),
    ],
)
def test_filters_match_a_reference(params: SamplingParams) -> None:
    vocab, draws = 5000, 3000
    logits = torch.linspace(2.0, 0.0, vocab)[torch.randperm(vocab, generator=make_generator(5))]
    support = _reference_support(logits, params)
    tokens = sample(logits.repeat(draws, 1), [params] * draws, [make_generator(9)] * draws)
    assert set(tokens) <= set(support)
    if len(support) > 100:  # wide: the draws must reach deep into the support
        ranks = {t: r for r, t in enumerate(sorted(support, key=lambda t: -support[t]))}
        assert max(ranks[t] for t in tokens) > 0.9 * len(support)
    else:
        for token, probability in support.items():
            assert abs(tokens.count(token) / draws - probability) < 0.02
