"""Hypothesis strategies for what a careless or hostile caller sends: any text, names a
server splits or parses, numbers at and past every width, NaN and infinities, and lists
far longer than any sane request."""

from __future__ import annotations

from hypothesis import strategies as st

UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1

# Strings a server parses, splits, stores or puts in a path: each has broken something
# somewhere (separators, NUL, path escapes, non-ASCII digits, numbers past SQL columns).
TRICKY_STRINGS = (
    "",
    " ",
    "\x00",
    "a\x00b",
    "\n",
    "..",
    "../../etc/passwd",
    "/",
    "//",
    "@",
    "tenant/name@",
    "tenant/name@0",
    "tenant/name@-1",
    "tenant/name@999999999999",
    "tenant/name@18446744073709551616",
    "tenant/name@\u0661\u0662",  # Arabic-Indic digits: isdigit() says yes, int() too
    "tenant/name@1e3",
    "a/b/c",
    "%00",
    "%2e%2e/%2e%2e",
    "file:///etc",
    "http://example.com/x",
    "lpx_",
    "lpx__",
    "lpx_x_y",
    "\u202eevil",  # right-to-left override
    "Ａ",  # full-width letter
    "\U0001f600",
    "x" * 300,
    "y" * 70_000,
)
# uint32/uint64 boundaries and the Postgres int4/int8 boundaries inside them.
UINT32_EDGES = (0, 1, 2, 255, 256, 2**15, 2**16, 2**31 - 1, 2**31, UINT32_MAX)
UINT64_EDGES = (*UINT32_EDGES, 2**32, 2**53 + 1, 2**63 - 1, 2**63, UINT64_MAX)


def text() -> st.SearchStrategy[str]:
    """Any text (every Unicode category but surrogates, which proto strings cannot
    carry), biased toward the strings in TRICKY_STRINGS."""
    return st.one_of(st.sampled_from(TRICKY_STRINGS), st.text(max_size=40))


def name_like(*real: str) -> st.SearchStrategy[str]:
    """Mostly names that exist (`real`) or look valid, sometimes anything at all."""
    valid = st.from_regex(r"\A[a-z][a-z0-9_-]{0,20}\Z")
    choices = [valid, text()]
    if real:
        choices.insert(0, st.sampled_from(real))
    return st.one_of(*choices)


def uint32() -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from(UINT32_EDGES), st.integers(0, UINT32_MAX))


def uint64() -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from(UINT64_EDGES), st.integers(0, UINT64_MAX))


def small_or_any_uint32(small: int) -> st.SearchStrategy[int]:
    """Values a request can really run with (0..small) half of the time."""
    return st.one_of(st.integers(0, small), uint32())


def float32() -> st.SearchStrategy[float]:
    """Every float32, NaN, the infinities and subnormals included."""
    return st.one_of(
        st.sampled_from((0.0, -0.0, 1.0, 1e-45, 1e-30, 100.0, 100.5, 3.4e38)),
        st.floats(width=32, allow_nan=True, allow_infinity=True),
    )


def lists(
    element: st.SearchStrategy, filler: object, max_small: int = 6, max_huge: int = 200_000
) -> st.SearchStrategy[list]:
    """A short list of `element`s, or an enormous one made of `filler` (enormous lists
    are built directly: drawing 10^5 elements one by one would take minutes)."""
    return st.one_of(
        st.lists(element, max_size=max_small),
        st.integers(1_000, max_huge).map(lambda n: [filler] * n),
    )


def ascii_metadata() -> st.SearchStrategy[str]:
    """Values gRPC metadata can carry (printable ASCII): bearer tokens good and bad."""
    printable = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
    return st.one_of(
        st.sampled_from(("", "Bearer", "Bearer ", "bearer x", "Basic abc", "Bearer lpx_",
                         "Bearer lpx_x_y", "Bearer lpx__", "Bearer lpx_" + "a" * 5000)),
        st.text(printable, max_size=60),
        st.text(printable, max_size=60).map(lambda s: "Bearer " + s),
    )  # fmt: skip
