"""Budget parsing and coercion: good specs, and every malformed one raising a BudgetError that names it."""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lrcc import Budget, BudgetError, LrccError


# --- well-formed specs ---------------------------------------------------------------------
def test_parse_params() -> None:
    b = Budget.parse("params=0.5")
    assert b == Budget(params=0.5)
    assert b.params == 0.5 and b.bytes is None and b.sram is None and b.max_error is None


def test_parse_bytes_and_max_error() -> None:
    b = Budget.parse("bytes=0.125,max_error=0.02")
    assert b.bytes == 0.125 and b.max_error == 0.02 and b.params is None


def test_parse_sizes_binary_units() -> None:
    b = Budget.parse("sram=320KB,flash=1MB")
    assert b.sram == 327680 and b.flash == 1048576
    assert isinstance(b.sram, int) and isinstance(b.flash, int)


@pytest.mark.parametrize("spec,field,value", [
    ("sram=320kb", "sram", 320 * 1024),
    ("sram=2KiB", "sram", 2048),
    ("flash=1GB", "flash", 1 << 30),
    ("flash=4096", "flash", 4096),
    ("flash=4096B", "flash", 4096),
    ("sram=0.5KB", "sram", 512),
    (" params = 1 ", "params", 1.0),
    ("latency=0.8", "latency", 0.8),
])
def test_parse_variants(spec: str, field: str, value) -> None:
    assert getattr(Budget.parse(spec), field) == value


def test_str_round_trip() -> None:
    b = Budget.parse("params=0.5,sram=320KB,max_error=0.02")
    assert Budget.parse(str(b)) == b
    assert str(Budget()) == "(none)"


def test_sizes_given_as_ints_and_strings_agree() -> None:
    assert Budget(sram=327680) == Budget(sram="320KB") == Budget(sram=327680.0)


# --- coerce ----------------------------------------------------------------------------------
def test_coerce_float_is_params() -> None:
    assert Budget.coerce(0.25) == Budget(params=0.25)
    assert Budget.coerce(1) == Budget(params=1.0)


def test_coerce_str_dict_none_budget() -> None:
    assert Budget.coerce("bytes=0.5") == Budget(bytes=0.5)
    assert Budget.coerce({"params": 0.5, "sram": "1KB"}) == Budget(params=0.5, sram=1024)
    assert Budget.coerce(None) is None
    b = Budget(latency=0.5)
    assert Budget.coerce(b) is b


@pytest.mark.parametrize("value,needle", [
    (True, "True"),
    ([0.5], "list"),
    (object(), "object"),
    ({"parms": 0.5}, "parms"),
    ({"params": "0.5"}, "params"),
    ({"sram": -1}, "sram"),
    (0.0, "params"),
    (1.5, "params"),
    (float("nan"), "nan"),
    ("", "empty"),
])
def test_coerce_rejects(value, needle: str) -> None:
    with pytest.raises(BudgetError) as e:
        Budget.coerce(value)
    assert needle in str(e.value)


# --- malformed specs -------------------------------------------------------------------------
@pytest.mark.parametrize("spec,needles", [
    ("", ["empty"]),
    ("   ", ["empty"]),
    ("foo=1", ["'foo'", "unknown key"]),
    ("params=0.5,prams=0.5", ["'prams'"]),
    ("params=0.5,params=0.4", ["'params'", "twice"]),
    ("sram=1KB,sram=2KB", ["'sram'", "twice"]),
    ("params=abc", ["params", "'abc'", "not a number"]),
    ("max_error=x", ["max_error", "'x'"]),
    ("params=0", ["params", "0"]),
    ("params=-0.5", ["params", "-0.5"]),
    ("params=1.5", ["params", "1.5"]),
    ("bytes=1.0000001", ["bytes"]),
    ("params=nan", ["params", "nan"]),
    ("latency=inf", ["latency", "inf"]),
    ("max_error=0", ["max_error"]),
    ("max_error=-1", ["max_error", "-1"]),
    ("max_error=nan", ["max_error", "nan"]),
    ("sram=-5KB", ["sram", "-5KB"]),
    ("flash=-1", ["flash", "-1"]),
    ("sram=0", ["sram", "'0'"]),
    ("sram=0KB", ["sram", "'0KB'"]),
    ("sram=5XB", ["sram", "'5XB'"]),
    ("flash=1TB", ["flash", "'1TB'"]),
    ("sram=1.5", ["sram", "'1.5'"]),
    ("sram=KB", ["sram", "'KB'"]),
    ("params", ["'params'", "key=value"]),
    ("params=", ["'params='"]),
    ("=0.5", ["'=0.5'"]),
    ("params=0.5,", ["params=0.5,"]),
    ("params=0.5;bytes=0.5", ["params", "0.5;bytes=0.5"]),
])
def test_parse_rejects(spec: str, needles: list[str]) -> None:
    with pytest.raises(BudgetError) as e:
        Budget.parse(spec)
    assert isinstance(e.value, LrccError)
    for needle in needles:
        assert needle in str(e.value), (spec, str(e.value))


@pytest.mark.parametrize("kwargs,needle", [
    ({"params": 0}, "params"),
    ({"bytes": 2}, "bytes"),
    ({"latency": math.nan}, "latency"),
    ({"params": True}, "params"),
    ({"sram": -1}, "sram"),
    ({"sram": 0}, "sram"),
    ({"flash": True}, "flash"),
    ({"flash": 1.5}, "flash"),
    ({"flash": [1]}, "flash"),
    ({"max_error": 0}, "max_error"),
    ({"max_error": math.inf}, "max_error"),
    ({"max_error": "0.1"}, "max_error"),
])
def test_constructor_rejects(kwargs: dict, needle: str) -> None:
    with pytest.raises(BudgetError) as e:
        Budget(**kwargs)
    assert needle in str(e.value)


def test_budget_error_is_lrcc_error() -> None:
    assert issubclass(BudgetError, LrccError)


# --- fuzz --------------------------------------------------------------------------------------
_KEYS = ["params", "bytes", "latency", "sram", "flash", "max_error", "foo", ""]
_VALUES = st.one_of(
    st.text(max_size=12),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-10**30, 10**30).map(str),
    st.builds(lambda n, u: f"{n}{u}", st.integers(-5, 10**25), st.sampled_from(["", "KB", "kib", "MB", "GB", "TB", "xb", " kb"])),
)
_PART = st.builds(lambda k, sep, v: f"{k}{sep}{v}", st.sampled_from(_KEYS), st.sampled_from(["=", "", "==", " = "]), _VALUES)


def _check(spec: str) -> None:
    try:
        b = Budget.parse(spec)
    except BudgetError as e:
        assert str(e)
        return
    # whatever parses is a valid budget
    for f in ("params", "bytes", "latency"):
        v = getattr(b, f)
        assert v is None or (isinstance(v, float) and 0 < v <= 1)
    for f in ("sram", "flash"):
        v = getattr(b, f)
        assert v is None or (isinstance(v, int) and v > 0)
    assert b.max_error is None or (math.isfinite(b.max_error) and b.max_error > 0)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_random_text_only_raises_budget_error(spec: str) -> None:
    _check(spec)


@settings(max_examples=300, deadline=None)
@given(st.lists(_PART, min_size=1, max_size=4).map(",".join))
def test_random_specs_only_raise_budget_error(spec: str) -> None:
    _check(spec)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.none(), st.booleans(), st.floats(), st.integers(), st.text(max_size=20),
                 st.dictionaries(st.sampled_from(_KEYS), st.one_of(st.floats(), st.integers(), st.text(max_size=6), st.none()),
                                 max_size=3)))
def test_coerce_only_raises_budget_error(value) -> None:
    try:
        Budget.coerce(value)
    except BudgetError:
        pass


def test_coerce_dict_with_mixed_unknown_keys() -> None:
    with pytest.raises(BudgetError, match="unknown field"):
        Budget.coerce({1: 0.5, "parms": 0.5})
