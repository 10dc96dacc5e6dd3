"""The static arena planner of the C backend (lrcc/codegen/c/memory.py).

Random DAG schedules (hypothesis) are planned with every strategy and checked by a brute-force
byte-by-byte overlap check written here, independent of memory.check_plan; hand-built examples pin
known arenas; corrupted plans and bad inputs must raise LrccError naming what is wrong.
"""
from __future__ import annotations

import dataclasses
import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lrcc.codegen.c.memory import STRATEGIES, MemoryPlan, Step, ascii_map, check_plan, plan_memory
from lrcc.errors import LrccError

EXTERNAL = frozenset({"x", "w", "y"})  # model input, a constant, the model output


def align_up(x: int, a: int) -> int:
    return -(-x // a) * a


# ---------------------------------------------------------------------------------------------
# random schedules


@st.composite
def schedules(draw, max_steps: int = 12):
    """(sizes, steps, external, align): a random DAG in a valid topological order, with chains,
    branches, long-lived (residual-like) buffers, constants, dead outputs, in-place flags, scratch."""
    n = draw(st.integers(1, max_steps))
    sizes: dict[str, int] = {}
    steps: list[Step] = []
    written: list[str] = []
    for i in range(n):
        pool = ["x", *written]
        reads = [written[-1]] if written and draw(st.booleans()) else []  # chains
        reads += draw(st.lists(st.sampled_from(pool), max_size=3))       # branches, residuals
        if draw(st.integers(0, 4)) == 0:
            reads.append("w")
        reads = list(dict.fromkeys(reads)) or ["x"]
        out = "y" if i == n - 1 and draw(st.booleans()) else f"b{i}"
        if out != "y":
            sizes[out] = draw(st.one_of(st.integers(0, 300), st.sampled_from([16, 64, 128, 256])))
            written.append(out)
        inplace = tuple(r for r in reads if draw(st.integers(0, 2)) > 0)
        scratch = draw(st.one_of(st.just(0), st.just(0), st.integers(1, 96)))
        steps.append(Step(f"op{i}", tuple(reads), out, scratch, inplace))
    align = draw(st.sampled_from([1, 4, 4, 8, 16]))
    return sizes, steps, set(EXTERNAL), align


def brute_force_check(plan: MemoryPlan, sizes, steps, external, align) -> None:
    """An independent check of a plan: topological order, lifetimes recomputed from scratch, and at
    every step a byte-by-byte ownership map of the arena where no byte has two live owners (except
    an in-place output over the dying input it took over)."""
    n = len(steps)
    order = plan.order
    assert sorted(order) == list(range(n))
    pos = {i: p for p, i in enumerate(order)}
    writer = {s.write: i for i, s in enumerate(steps)}
    for i, s in enumerate(steps):
        for r in s.reads:
            assert r in external or pos[writer[r]] < pos[i], f"{s.name} runs before the writer of {r}"

    live: dict[str, tuple[int, int, int]] = {}  # buffer -> (first, last, size)
    for i, s in enumerate(steps):
        if s.write not in external:
            readers = [pos[j] for j, t in enumerate(steps) if s.write in t.reads]
            live[s.write] = (pos[i], max(readers, default=pos[i]), sizes[s.write])
        if s.scratch:
            live[f"{s.name}#scratch"] = (pos[i], pos[i], s.scratch)
    assert set(plan.offsets) == set(live)
    assert not set(plan.offsets) & set(external)
    assert {k: v[:2] for k, v in live.items()} == plan.lifetimes

    for out, inp in plan.shared.items():
        i = writer[out]
        assert out not in external and inp not in external
        assert inp in steps[i].inplace and inp in steps[i].reads
        assert live[inp][1] == pos[i], f"{inp} is read after {out} overwrote it"
        assert plan.offsets[out] == plan.offsets[inp]

    assert plan.arena_bytes % align == 0
    for b, (_, _, size) in live.items():
        assert plan.offsets[b] % align == 0 and plan.offsets[b] >= 0
        assert plan.offsets[b] + size <= plan.arena_bytes
    for p in range(n):
        owner: list[str | None] = [None] * plan.arena_bytes
        for b, (first, last, size) in live.items():
            if not first <= p <= last:
                continue
            for byte in range(plan.offsets[b], plan.offsets[b] + size):
                other = owner[byte]
                if other is not None:
                    assert plan.shared.get(b) == other or plan.shared.get(other) == b, \
                        f"{b} and {other} share byte {byte} at step {p}"
                owner[byte] = b


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedules())
def test_random_schedules_every_strategy(case):
    sizes, steps, external, align = case
    plans = {s: plan_memory(sizes, steps, external, strategy=s, align=align) for s in STRATEGIES}
    for plan in plans.values():
        check_plan(plan, steps, external)
        brute_force_check(plan, sizes, steps, external, align)
        assert plan.peak_live <= plan.arena_bytes
    naive, greedy, lrcc = (plans[s] for s in ("naive", "greedy", "lrcc"))
    assert naive.arena_bytes == sum(align_up(s, align) for s in naive.sizes.values())
    assert lrcc.arena_bytes <= greedy.arena_bytes <= naive.arena_bytes
    assert naive.order == greedy.order == list(range(len(steps)))
    assert not naive.shared and not greedy.shared


@settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedules(max_steps=40))
def test_random_larger_schedules_use_the_heuristic_search(case):
    sizes, steps, external, align = case
    greedy = plan_memory(sizes, steps, external, strategy="greedy", align=align)
    lrcc = plan_memory(sizes, steps, external, strategy="lrcc", align=align)
    brute_force_check(lrcc, sizes, steps, external, align)
    assert lrcc.arena_bytes <= greedy.arena_bytes


def topological_orders(steps):
    writer = {s.write: i for i, s in enumerate(steps)}
    for perm in itertools.permutations(range(len(steps))):
        pos = {i: p for p, i in enumerate(perm)}
        if all(r not in writer or pos[writer[r]] < pos[i] for i, s in enumerate(steps) for r in s.reads):
            yield list(perm)


@settings(max_examples=40, deadline=None, database=None)
@given(schedules(max_steps=6))
def test_exact_search_beats_greedy_on_every_order(case):
    """Where lrcc says its search was exhaustive, no schedule gives TFLM's greedy a smaller arena."""
    sizes, steps, external, align = case
    lrcc = plan_memory(sizes, steps, external, strategy="lrcc", align=align, node_limit=10**6)
    best_greedy = min(plan_memory(sizes, [steps[i] for i in order], external, "greedy", align).arena_bytes
                      for order in topological_orders(steps))
    assert lrcc.exact
    assert lrcc.arena_bytes <= best_greedy


# ---------------------------------------------------------------------------------------------
# hand-computed examples


def chain():
    """x -> a (100) -> b (60) -> c (100, 16 bytes scratch) -> y: peak at steps 1 and 2 is 160 + 16."""
    sizes = {"a": 100, "b": 60, "c": 100}
    steps = [Step("s0", ("x",), "a"), Step("s1", ("a",), "b"), Step("s2", ("b",), "c", scratch=16),
             Step("s3", ("c",), "y")]
    return sizes, steps


def test_chain_has_known_optimal_arena():
    sizes, steps = chain()
    naive = plan_memory(sizes, steps, EXTERNAL, "naive")
    greedy = plan_memory(sizes, steps, EXTERNAL, "greedy")
    lrcc = plan_memory(sizes, steps, EXTERNAL, "lrcc")
    assert naive.arena_bytes == 100 + 60 + 100 + 16
    # step 2 holds b (60), c (100) and the scratch (16) at once: 176 is a lower bound, and reached
    assert greedy.arena_bytes == lrcc.arena_bytes == 176
    assert greedy.offsets == {"a": 0, "c": 0, "b": 100, "s2#scratch": 160}
    assert greedy.lifetimes == {"a": (0, 1), "b": (1, 2), "c": (2, 3), "s2#scratch": (2, 2)}
    assert lrcc.exact and lrcc.peak_live == 176
    for plan in (naive, greedy, lrcc):
        check_plan(plan, steps, EXTERNAL)


def test_inplace_chain_reuses_one_region():
    """x -> a (64) -relu-> b (64) -lut-> c (64) -> y: in place, one 64-byte region serves all three."""
    sizes = {"a": 64, "b": 64, "c": 64}
    steps = [Step("conv", ("x", "w"), "a"), Step("relu", ("a",), "b", inplace=("a",)),
             Step("lut", ("b",), "c", inplace=("b",)), Step("head", ("c", "w"), "y")]
    greedy = plan_memory(sizes, steps, EXTERNAL, "greedy")
    lrcc = plan_memory(sizes, steps, EXTERNAL, "lrcc")
    assert greedy.arena_bytes == 128
    assert lrcc.arena_bytes == 64
    assert lrcc.shared == {"b": "a", "c": "b"}
    assert lrcc.offsets == {"a": 0, "b": 0, "c": 0}


def test_inplace_needs_the_input_to_die():
    """A relu whose input is read again later (a residual) may not overwrite it."""
    sizes = {"a": 64, "b": 64, "c": 64}
    steps = [Step("conv", ("x",), "a"), Step("relu", ("a",), "b", inplace=("a",)),
             Step("add", ("b", "a"), "c", inplace=("b", "a")), Step("head", ("c",), "y")]
    lrcc = plan_memory(sizes, steps, EXTERNAL, "lrcc")
    check_plan(lrcc, steps, EXTERNAL)
    assert "b" not in lrcc.shared
    assert lrcc.shared.get("c") in {"a", "b"}
    assert lrcc.arena_bytes == 128


def test_external_buffers_are_never_placed_nor_reused():
    sizes = {"a": 32}
    steps = [Step("relu", ("x",), "a", inplace=("x",)), Step("relu2", ("a",), "y", inplace=("a",))]
    for strategy in STRATEGIES:
        plan = plan_memory(sizes, steps, EXTERNAL, strategy)
        assert set(plan.offsets) == {"a"} and plan.shared == {}
        assert plan.arena_bytes == 32


def residual_block():
    """A residual block emitted breadth first: both branches' wide (192-byte) intermediates
    interleaved, then a 48-byte add. Given order, no in-place: relu_b holds a2, b1 and b2 at once
    (576 bytes). lrcc runs branch a to its narrow end first and reuses every relu/add input in
    place: the peak is 192 + 48 + 48 = 288 (conv_a2: a2, h, a3), an arena of 288."""
    sizes = {"h": 48, "a1": 192, "a2": 192, "a3": 48, "b1": 192, "b2": 192, "b3": 48, "s": 48}
    steps = [
        Step("stem", ("x", "w"), "h"),
        Step("conv_a", ("h", "w"), "a1", scratch=0),
        Step("proj_b", ("h", "w"), "b1"),
        Step("relu_a", ("a1",), "a2", inplace=("a1",)),
        Step("relu_b", ("b1",), "b2", inplace=("b1",)),
        Step("conv_a2", ("a2", "w"), "a3"),
        Step("conv_b2", ("b2", "w"), "b3"),
        Step("add", ("a3", "b3"), "s", inplace=("a3", "b3")),
        Step("head", ("s",), "y"),
    ]
    return sizes, steps


def test_residual_block_inplace_and_ordering_beat_greedy():
    sizes, steps = residual_block()
    naive = plan_memory(sizes, steps, EXTERNAL, "naive")
    greedy = plan_memory(sizes, steps, EXTERNAL, "greedy")
    lrcc = plan_memory(sizes, steps, EXTERNAL, "lrcc")
    for plan in (naive, greedy, lrcc):
        check_plan(plan, steps, EXTERNAL)
        brute_force_check(plan, sizes, steps, EXTERNAL, 4)
    assert naive.arena_bytes == sum(sizes.values()) == 960
    assert greedy.arena_bytes == 576
    assert lrcc.arena_bytes == 288 and lrcc.exact
    assert lrcc.order != list(range(len(steps)))  # reordered ...
    assert {"a2": "a1", "b2": "b1"}.items() <= lrcc.shared.items()  # ... and in place
    # in place alone, on the given order, still holds a2 (192) beside b1/b2 (192): at least 432
    in_order_peak = 48 + 192 + 192
    assert lrcc.arena_bytes < in_order_peak


def residual_chain(blocks: int, width: int = 128):
    """A stem and `blocks` residual blocks h -> conv1 (2x wide, 32 B scratch) -> relu -> conv2 ->
    add(., h) -> relu, then a head; the relus and the add may work in place."""
    sizes: dict[str, int] = {"h_in": width}
    steps = [Step("stem", ("x", "w"), "h_in")]
    h = "h_in"
    for k in range(blocks):
        c1, r1, c2, s, out = (f"{n}_{k}" for n in ("c1", "r1", "c2", "s", "h"))
        sizes.update({c1: 2 * width, r1: 2 * width, c2: width, s: width, out: width})
        steps += [
            Step(f"conv1_{k}", (h, "w"), c1, scratch=32),
            Step(f"relu1_{k}", (c1,), r1, inplace=(c1,)),
            Step(f"conv2_{k}", (r1, "w"), c2, scratch=32),
            Step(f"add_{k}", (c2, h), s, inplace=(c2, h)),
            Step(f"relu2_{k}", (s,), out, inplace=(s,)),
        ]
        h = out
    steps.append(Step("head", (h, "w"), "y"))
    return sizes, steps


def test_chain_of_residual_blocks():
    """Without in-place, relu1 holds h, c1 and r1 (5 x 128 = 640 B); in place the peak is conv2's
    h + r1 + c2 + scratch = 128 + 256 + 128 + 32 = 544 B, which lrcc reaches."""
    sizes, steps = residual_chain(3)
    plans = {s: plan_memory(sizes, steps, EXTERNAL, s) for s in STRATEGIES}
    for plan in plans.values():
        brute_force_check(plan, sizes, steps, EXTERNAL, 4)
    assert plans["naive"].arena_bytes == sum(sizes.values()) + 6 * 32
    assert plans["greedy"].arena_bytes == 640
    assert plans["lrcc"].arena_bytes == 544 and plans["lrcc"].exact


# ---------------------------------------------------------------------------------------------
# check_plan catches corrupted plans


def good_plan():
    sizes, steps = chain()
    plan = plan_memory(sizes, steps, EXTERNAL, "greedy")
    check_plan(plan, steps, EXTERNAL)
    return plan, steps


def corrupted(plan: MemoryPlan, **changes) -> MemoryPlan:
    return dataclasses.replace(plan, **changes)


def test_check_plan_raises_on_overlapping_live_buffers():
    plan, steps = good_plan()
    bad = corrupted(plan, offsets={**plan.offsets, "b": 40})  # b [40, 100) over a [0, 100) at step s1
    with pytest.raises(LrccError, match=r"'a'.*'b'.*overlap.*step 's1'"):
        check_plan(bad, steps, EXTERNAL)
    bad = corrupted(plan, offsets={**plan.offsets, "s2#scratch": 100})  # scratch over b at s2
    with pytest.raises(LrccError, match=r"'s2#scratch' \[100, 116\) and 'b' \[100, 160\) overlap.*step 's2'"):
        check_plan(bad, steps, EXTERNAL)


def test_check_plan_raises_on_buffer_past_the_arena_and_misalignment():
    plan, steps = good_plan()
    with pytest.raises(LrccError, match=r"'s2#scratch'.*past the end of the 170-byte arena"):
        check_plan(corrupted(plan, arena_bytes=170), steps, EXTERNAL)
    with pytest.raises(LrccError, match=r"'b'.*offset 102.*multiple of 4"):
        check_plan(corrupted(plan, offsets={**plan.offsets, "b": 102}, arena_bytes=200), steps, EXTERNAL)


def test_check_plan_raises_on_bad_order_and_bogus_inplace():
    plan, steps = good_plan()
    with pytest.raises(LrccError, match=r"runs step 's2' before step 's1'"):
        check_plan(corrupted(plan, order=[0, 2, 1, 3]), steps, EXTERNAL)
    with pytest.raises(LrccError, match="not a permutation"):
        check_plan(corrupted(plan, order=[0, 1, 1, 3]), steps, EXTERNAL)
    # b may not take over a: s1 does not list a as an in-place input
    bad = corrupted(plan, offsets={**plan.offsets, "b": 0}, shared={"b": "a"})
    with pytest.raises(LrccError, match=r"'s1' may not write 'b' in place of 'a'"):
        check_plan(bad, steps, EXTERNAL)
    with pytest.raises(LrccError, match=r"'b' has no arena offset"):
        check_plan(corrupted(plan, offsets={k: v for k, v in plan.offsets.items() if k != "b"}), steps, EXTERNAL)
    with pytest.raises(LrccError, match=r"external buffer 'x'"):
        check_plan(corrupted(plan, offsets={**plan.offsets, "x": 0}), steps, EXTERNAL)


def test_check_plan_raises_when_inplace_input_is_still_read():
    sizes = {"a": 64, "b": 64, "c": 64}
    steps = [Step("conv", ("x",), "a"), Step("relu", ("a",), "b", inplace=("a",)),
             Step("add", ("b", "a"), "c"), Step("head", ("c",), "y")]
    plan = plan_memory(sizes, steps, EXTERNAL, "lrcc")
    bad = corrupted(plan, offsets={**plan.offsets, "b": plan.offsets["a"]}, shared={"b": "a"})
    with pytest.raises(LrccError, match=r"in place of 'a'.*still read at step 'add'"):
        check_plan(bad, steps, EXTERNAL)


# ---------------------------------------------------------------------------------------------
# bad input


def test_bad_input_names_the_step_and_buffer():
    with pytest.raises(LrccError, match=r"step 'mm' reads buffer 'ghost'.*not external"):
        plan_memory({"a": 4}, [Step("mm", ("x", "ghost"), "a")], EXTERNAL)
    with pytest.raises(LrccError, match=r"'a' is written by step 's0' and again by step 's1'"):
        plan_memory({"a": 4}, [Step("s0", ("x",), "a"), Step("s1", ("a",), "a")], EXTERNAL)
    with pytest.raises(LrccError, match=r"no size for buffer 'b' \(used by step 's1'\)"):
        plan_memory({"a": 4}, [Step("s0", ("x",), "a"), Step("s1", ("a",), "b")], EXTERNAL)
    with pytest.raises(LrccError, match=r"step 's1' reads buffer 'b' before step 's2' writes it"):
        plan_memory({"a": 4, "b": 4}, [Step("s0", ("x",), "a"), Step("s1", ("b",), "y"), Step("s2", ("a",), "b")],
                    EXTERNAL)
    with pytest.raises(LrccError, match=r"buffer 'a' \(step 's0'\) has size -1"):
        plan_memory({"a": -1}, [Step("s0", ("x",), "a")], EXTERNAL)
    with pytest.raises(LrccError, match="unknown strategy 'best'"):
        plan_memory({"a": 4}, [Step("s0", ("x",), "a")], EXTERNAL, strategy="best")
    with pytest.raises(LrccError, match=r"step 's0' marks 'z' as in-place but does not read it"):
        plan_memory({"a": 4}, [Step("s0", ("x",), "a", inplace=("z",))], EXTERNAL)
    with pytest.raises(LrccError, match="two steps are named 's0'"):
        plan_memory({"a": 4, "b": 4}, [Step("s0", ("x",), "a"), Step("s0", ("a",), "b")], EXTERNAL)


def test_empty_program_has_empty_arena():
    plan = plan_memory({}, [], EXTERNAL)
    assert plan.arena_bytes == 0 and plan.order == [] and plan.offsets == {}
    check_plan(plan, [], EXTERNAL)
    assert "arena 0 bytes" in ascii_map(plan)


# ---------------------------------------------------------------------------------------------
# ascii_map


def test_ascii_map_shows_every_live_buffer():
    sizes, steps = residual_block()
    plan = plan_memory(sizes, steps, EXTERNAL, "lrcc")
    text = ascii_map(plan, width=96)
    lines = text.splitlines()
    assert lines[0].startswith(f"arena {plan.arena_bytes} bytes")
    assert str(plan.arena_bytes) in lines[1] and lines[1].lstrip().startswith("0")
    rows = lines[3:3 + len(plan.order)]
    legend = {}
    for line in lines[lines.index("legend:") + 1:]:
        symbol, rest = line.split(maxsplit=1)
        legend[rest.split(":")[0]] = symbol
    assert set(legend) == set(plan.offsets)
    for p, row in enumerate(rows):
        assert steps[plan.order[p]].name in row
        cells = row[row.index("|") + 1:row.rindex("|")]
        assert len(cells) == 96
        for name, (first, last) in plan.lifetimes.items():
            taken_over = name in plan.shared.values() and p == last  # drawn under its in-place output
            if first <= p <= last and not taken_over:
                assert legend[name] in cells, f"{name} not drawn at step {p}:\n{text}"
            if not first <= p <= last:
                assert legend[name] not in cells


def test_ascii_map_with_more_buffers_than_symbols():
    n = 150
    sizes = {f"b{i}": 8 for i in range(n)}
    steps = [Step(f"s{i}", (f"b{i - 1}" if i else "x",), f"b{i}") for i in range(n)]
    plan = plan_memory(sizes, steps, EXTERNAL, "greedy")
    text = ascii_map(plan)
    for i in range(n):
        assert f" b{i}: bytes" in text
