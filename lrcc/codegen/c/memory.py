"""The static memory planner of the C backend: one arena, a fixed offset for every activation.

The planner sees a program as a list of steps, each reading some buffers and writing one, with
the bytes of every buffer. External buffers (the model's input and output, which the caller owns,
and constants in flash) are never placed in the arena. Every other buffer is live from the step
that writes it to the last step that reads it (a buffer nobody reads is live only at its own
step); a step's scratch bytes are a buffer live only at that step. Two buffers may share arena
bytes only if their lifetimes are disjoint, with one exception: an in-place step (elementwise or
row-wise) may write its output over an input it lists in ``Step.inplace`` when that input is read
by no later step; the output then starts at the input's offset.

Strategies:

- ``naive``: every buffer its own region, in schedule order (no reuse; the baseline).
- ``greedy``: TensorFlow Lite Micro's greedy-by-size planner on the given schedule: buffers sorted
  by size, largest first, each put at the lowest aligned offset where it overlaps no placed buffer
  whose lifetime intersects its own (first fit over the gaps). No in-place reuse.
- ``lrcc``: (a) in-place reuse; (b) a search over schedules (topological orders): a dynamic
  programme over the sets of executed steps gives the order of least peak live bytes (exact while
  the sets stay few, a beam beyond), and for small graphs a branch-and-bound over all orders, with
  the peak live bytes of a prefix as its bound, minimises the arena itself; (c) for every order
  tried, several placement orders (by size, by lifetime start, by size x lifetime, by lifetime)
  with and without in-place reuse, keeping the smallest arena. The given order, without in-place
  reuse, placed by size, is always among the candidates, so ``lrcc`` is never worse than
  ``greedy``.

Offsets are multiples of ``align``; ``arena_bytes`` is rounded up to ``align`` too, so for any
strategy arena_bytes <= the naive sum of aligned sizes.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ...errors import LrccError

STRATEGIES = ("naive", "greedy", "lrcc")
PLACEMENTS = ("size", "start", "area", "length")  # placement orders tried by "lrcc"
EXACT_STEPS = 16        # branch-and-bound over all schedules up to this many steps
NODE_LIMIT = 4000       # search nodes of the branch-and-bound (a full evaluation counts LEAF_COST)
LEAF_COST = 8
DP_WORK = 60_000        # state expansions the schedule DP may spend; beyond it, a beam


@dataclass(frozen=True)
class Step:
    """One operator of the schedule as the planner sees it."""

    name: str                  # op name
    reads: tuple[str, ...]     # buffer names read
    write: str                 # the one buffer written
    scratch: int = 0           # temporary bytes the op needs only during this step
    inplace: tuple[str, ...] = ()  # inputs whose storage the output may reuse (elementwise/row-wise ops) when that input is not read by any later step


@dataclass
class MemoryPlan:
    """Where every arena buffer lives, in which schedule, and how large the arena is."""

    strategy: str
    order: list[int]            # the schedule, as indices into the given steps (a topological order)
    offsets: dict[str, int]     # arena offset of every arena buffer; scratch of step i under key f"{steps[i].name}#scratch"
    sizes: dict[str, int]
    lifetimes: dict[str, tuple[int, int]]  # buffer -> (first, last) position in `order` where it is live (written .. last read)
    arena_bytes: int
    shared: dict[str, str]      # output buffer -> input buffer whose storage it took over (in-place)
    align: int = 4
    peak_live: int = 0          # most bytes live at one step of `order` (a lower bound on arena_bytes)
    exact: bool = False         # "lrcc": no schedule beats it (for its placements), or it meets the lower bound
    step_names: list[str] = field(default_factory=list)  # steps[i].name, for ascii_map


def scratch_key(step: Step) -> str:
    """The arena key of a step's scratch buffer."""
    return f"{step.name}#scratch"


def _align_up(x: int, align: int) -> int:
    return -(-x // align) * align


def _bits(mask: int) -> Iterable[int]:
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


# ---------------------------------------------------------------------------------------------
# the validated graph


class _Graph:
    """Steps checked and indexed: arena reads, dependencies, readers, sizes."""

    def __init__(self, sizes: dict[str, int], steps: list[Step], external: Iterable[str]):
        self.steps = list(steps)
        self.external = frozenset(external)
        n = len(self.steps)
        names: dict[str, int] = {}
        writer: dict[str, int] = {}
        for i, st in enumerate(self.steps):
            if not isinstance(st, Step):
                raise LrccError(f"memory plan: steps[{i}] is {type(st).__name__}, expected memory.Step")
            if st.name in names:
                raise LrccError(f"memory plan: two steps are named {st.name!r} (steps {names[st.name]} and {i}); "
                                "step names must be unique because they key the scratch buffers")
            names[st.name] = i
            if st.write in writer:
                first = self.steps[writer[st.write]].name
                raise LrccError(f"memory plan: buffer {st.write!r} is written by step {first!r} and again by step "
                                f"{st.name!r}; every buffer must have exactly one writer")
            writer[st.write] = i
        self.writer = writer

        self.size: dict[str, int] = {}
        self.reads: list[tuple[str, ...]] = []
        self.arena_reads: list[tuple[str, ...]] = []
        self.out_arena: list[bool] = []
        self.scratch: list[int] = []
        self.inplace_ok: list[frozenset[str]] = []
        self.deps = [0] * n
        self.succ: list[list[int]] = [[] for _ in range(n)]
        self.readers: dict[str, int] = {}   # arena buffer -> bitmask of the steps reading it
        for i, st in enumerate(self.steps):
            reads = tuple(dict.fromkeys(st.reads))
            for r in reads:
                if r == st.write:
                    raise LrccError(f"memory plan: step {st.name!r} reads its own output {r!r}")
                if r in writer:
                    if writer[r] > i:
                        raise LrccError(f"memory plan: step {st.name!r} reads buffer {r!r} before step "
                                        f"{self.steps[writer[r]].name!r} writes it; give the steps in a "
                                        "topological order")
                    self.deps[i] |= 1 << writer[r]
                elif r not in self.external:
                    raise LrccError(f"memory plan: step {st.name!r} reads buffer {r!r}, which no step writes and "
                                    "which is not external; list it in `external` (model input or constant) or "
                                    "add its producer")
            for inp in st.inplace:
                if inp not in reads:
                    raise LrccError(f"memory plan: step {st.name!r} marks {inp!r} as in-place but does not read it")
            if not isinstance(st.scratch, int) or st.scratch < 0:
                raise LrccError(f"memory plan: step {st.name!r} has scratch {st.scratch!r}; "
                                "it must be a byte count >= 0")
            arena_reads = tuple(r for r in reads if r not in self.external)
            for b in (*arena_reads, st.write):
                if b in self.external or b in self.size:
                    continue
                if b not in sizes:
                    raise LrccError(f"memory plan: no size for buffer {b!r} (used by step {st.name!r}); "
                                    "give its byte count in `sizes` or mark it external")
                s = sizes[b]
                if isinstance(s, bool) or not isinstance(s, int) or s < 0:
                    raise LrccError(f"memory plan: buffer {b!r} (step {st.name!r}) has size {s!r}; "
                                    "it must be a byte count >= 0")
                self.size[b] = int(s)
            out_arena = st.write not in self.external
            if st.scratch > 0 and scratch_key(st) in writer:
                raise LrccError(f"memory plan: the scratch key {scratch_key(st)!r} of step {st.name!r} "
                                "is also a buffer name")
            self.reads.append(reads)
            self.arena_reads.append(arena_reads)
            self.out_arena.append(out_arena)
            self.scratch.append(int(st.scratch))
            self.inplace_ok.append(frozenset(r for r in st.inplace if r in arena_reads) if out_arena else frozenset())
            for r in arena_reads:
                self.readers[r] = self.readers.get(r, 0) | (1 << i)
        for i in range(n):
            for d in _bits(self.deps[i]):
                self.succ[d].append(i)
        self.n = n
        self.full = (1 << n) - 1
        self.out_size = [self.size[st.write] if self.out_arena[i] else 0 for i, st in enumerate(self.steps)]
        self.scratch_size = {scratch_key(st): self.scratch[i] for i, st in enumerate(self.steps) if self.scratch[i] > 0}
        self.out_kept = [self.out_size[i] if self.readers.get(st.write, 0) else 0 for i, st in enumerate(self.steps)]

    # -- the search's view: executed set T, live bytes after T ------------------------------

    def initial_ready(self) -> int:
        return sum(1 << i for i in range(self.n) if self.deps[i] == 0)

    def advance(self, done: int, i: int, live: int, ready: int) -> tuple[int, int, int]:
        """Run step i after the steps in `done`: (bytes live during it, live after, ready after)."""
        after = done | (1 << i)
        freed = saving = 0
        for r in self.arena_reads[i]:
            if self.readers[r] & ~after == 0:
                freed += self.size[r]
                if r in self.inplace_ok[i]:
                    saving = max(saving, min(self.size[r], self.out_size[i]))
        during = live + self.scratch[i] + self.out_size[i] - saving
        ready = ready & ~(1 << i)
        for s in self.succ[i]:
            if self.deps[s] & ~after == 0:
                ready |= 1 << s
        return during, live - freed + self.out_kept[i], ready

    def check_order(self, order: list[int]) -> None:
        """Raise unless `order` is a permutation of the steps that respects every dependency."""
        if sorted(order) != list(range(self.n)):
            raise LrccError(f"memory plan: the order {order} is not a permutation of the {self.n} steps")
        done = 0
        for i in order:
            if self.deps[i] & ~done:
                missing = next(_bits(self.deps[i] & ~done))
                raise LrccError(f"memory plan: the order runs step {self.steps[i].name!r} before step "
                                f"{self.steps[missing].name!r}, whose output it reads")
            done |= 1 << i

    def lifetimes(self, order: list[int]) -> dict[str, tuple[int, int]]:
        """Arena buffer (and scratch key) -> (first, last) position in `order` where it is live."""
        life: dict[str, tuple[int, int]] = {}
        for p, i in enumerate(order):
            st = self.steps[i]
            for r in self.arena_reads[i]:
                life[r] = (life[r][0], p)
            if self.out_arena[i]:
                life[st.write] = (p, p)
            if self.scratch[i] > 0:
                life[scratch_key(st)] = (p, p)
        return life

    def buffer_size(self, key: str) -> int:
        """Bytes of an arena buffer or scratch key."""
        return self.size[key] if key in self.size else self.scratch_size[key]

    def inplace_pairs(self, order: list[int], life: dict[str, tuple[int, int]]) -> dict[str, str]:
        """Output -> the dying in-place input it overwrites, choosing the input it overlaps most."""
        shared: dict[str, str] = {}
        for p, i in enumerate(order):
            out = self.steps[i].write
            best = None
            for r in sorted(self.inplace_ok[i]):
                if life[r][1] != p:
                    continue
                key = (min(self.size[r], self.out_size[i]), self.size[r])
                if best is None or key > best[0]:
                    best = (key, r)
            if best is not None:
                shared[out] = best[1]
        return shared

    def peak_live(self, order: list[int], shared: dict[str, str]) -> int:
        """Most bytes live at one position of `order` (in-place pairs counted once where they overlap)."""
        done = live = peak = 0
        ready = self.initial_ready()
        for i in order:
            during, live, ready = self.advance(done, i, live, ready)
            out = self.steps[i].write
            if self.out_arena[i] and out not in shared:  # advance() assumed the best in-place saving
                during += max((min(self.size[r], self.out_size[i]) for r in self.inplace_ok[i]
                               if self.readers[r] & ~(done | 1 << i) == 0), default=0)
            peak = max(peak, during)
            done |= 1 << i
        return peak


# ---------------------------------------------------------------------------------------------
# placement


@dataclass
class _Layout:
    arena: int
    order: list[int]
    offsets: dict[str, int]
    sizes: dict[str, int]
    life: dict[str, tuple[int, int]]
    shared: dict[str, str]


def _groups(g: _Graph, order: list[int], life: dict[str, tuple[int, int]],
            shared: dict[str, str]) -> list[list[tuple[str, int, int, int]]]:
    """Buffers that must share an offset (in-place chains), each member (name, size, first, last),
    in order of creation."""
    groups: list[list[tuple[str, int, int, int]]] = []
    group_of: dict[str, int] = {}
    for i in order:
        st = g.steps[i]
        if g.out_arena[i]:
            member = (st.write, g.size[st.write], *life[st.write])
            if st.write in shared:
                gi = group_of[shared[st.write]]
                groups[gi].append(member)
            else:
                gi = len(groups)
                groups.append([member])
            group_of[st.write] = gi
        if g.scratch[i] > 0:
            key = scratch_key(st)
            groups.append([(key, g.scratch[i], *life[key])])
    return groups


def _placement_key(kind: str) -> Callable[[tuple[int, list[tuple[str, int, int, int]]]], tuple]:
    """Sort key of (group index, members) for a placement order: "size" (largest first, TFLM's),
    "start" (earliest first), "area" (largest size x lifetime first), "length" (longest-lived first)."""
    def key(item: tuple[int, list[tuple[str, int, int, int]]]) -> tuple:
        gi, members = item
        size = max(m[1] for m in members)
        start = min(m[2] for m in members)
        length = max(m[3] for m in members) - start + 1
        area = sum(m[1] * (m[3] - m[2] + 1) for m in members)
        return {"size": (-size, start, gi), "start": (start, -size, gi),
                "area": (-area, -size, start, gi), "length": (-length, -size, start, gi)}[kind]
    return key


def _place(groups: list[list[tuple[str, int, int, int]]], kind: str, align: int,
           cutoff: int | None) -> tuple[int, dict[str, int]] | None:
    """First fit of the groups in `kind` order: each at the lowest aligned offset where none of its
    members overlaps a placed buffer live at the same time. None once the arena reaches `cutoff`."""
    occupants: dict[int, list[tuple[int, int, int]]] = {}  # position -> (id, offset, size) placed there
    offsets: dict[str, int] = {}
    arena = 0
    uid = 0
    for _, members in sorted(enumerate(groups), key=_placement_key(kind)):
        forbidden = []  # offset o is forbidden when lo < o < hi
        for _, size, first, last in members:
            if size == 0:
                continue
            seen = set()
            for p in range(first, last + 1):
                for pid, off, psize in occupants.get(p, ()):
                    if pid not in seen:
                        seen.add(pid)
                        forbidden.append((off - size, off + psize))
        forbidden.sort()
        o = 0
        for lo, hi in forbidden:
            if lo >= o:
                break
            if o < hi:
                o = _align_up(hi, align)
        top = max(m[1] for m in members)
        arena = max(arena, _align_up(o + top, align))
        if cutoff is not None and arena >= cutoff:
            return None
        for name, size, first, last in members:
            offsets[name] = o
            if size == 0:
                continue
            uid += 1
            for p in range(first, last + 1):
                occupants.setdefault(p, []).append((uid, o, size))
    return arena, offsets


def _layout(g: _Graph, order: list[int], align: int, configs: list[tuple[bool, str]],
            cutoff: int | None = None) -> _Layout | None:
    """The smallest arena for a fixed schedule over the (in-place?, placement order) configs;
    None if none beats `cutoff`."""
    life = g.lifetimes(order)
    best: _Layout | None = None
    cache: dict[bool, tuple[dict[str, str], list]] = {}
    for inplace, kind in configs:
        if inplace not in cache:
            shared = g.inplace_pairs(order, life) if inplace else {}
            cache[inplace] = (shared, _groups(g, order, life, shared))
        shared, groups = cache[inplace]
        if inplace and not shared and (False, kind) in configs:
            continue  # no in-place pair in this schedule: the same as the plain config
        limit = best.arena if best is not None else cutoff
        placed = _place(groups, kind, align, limit)
        if placed is None:
            continue
        arena, offsets = placed
        sizes = {k: g.buffer_size(k) for k in offsets}
        best = _Layout(arena, list(order), offsets, sizes, life, dict(shared))
    return best


def _naive(g: _Graph, order: list[int], align: int) -> _Layout:
    life = g.lifetimes(order)
    offsets: dict[str, int] = {}
    top = 0
    for i in order:
        st = g.steps[i]
        keys = ([st.write] if g.out_arena[i] else []) + ([scratch_key(st)] if g.scratch[i] > 0 else [])
        for k in keys:
            offsets[k] = top
            top = _align_up(top + g.buffer_size(k), align)
    return _Layout(top, list(order), offsets, {k: g.buffer_size(k) for k in offsets}, life, {})


# ---------------------------------------------------------------------------------------------
# schedule search


def _min_peak_order(g: _Graph) -> tuple[list[int], int, bool]:
    """The order of least peak live bytes by DP over executed sets: (order, peak, exact).
    A layer with more states than the work budget allows is cut to its best ones (a beam)."""
    layer = {0: (0, 0, g.initial_ready())}  # executed set -> (peak, live, ready)
    parents: list[dict[int, tuple[int, int]]] = []
    exact = True
    work = 0
    branching = 1.0
    for k in range(g.n):
        nxt: dict[int, tuple[int, int, int]] = {}
        par: dict[int, tuple[int, int]] = {}
        expansions = 0
        for done, (peak, live, ready) in layer.items():
            for i in _bits(ready):
                expansions += 1
                during, live2, ready2 = g.advance(done, i, live, ready)
                peak2 = max(peak, during)
                after = done | (1 << i)
                if after not in nxt or peak2 < nxt[after][0]:
                    nxt[after] = (peak2, live2, ready2)
                    par[after] = (done, i)
        work += expansions
        branching = max(1.0, expansions / len(layer))
        beam = max(4, int((DP_WORK - work) / (branching * (g.n - k))))
        if len(nxt) > beam:
            exact = False
            nxt = dict(sorted(nxt.items(), key=lambda kv: (kv[1][0], kv[1][1]))[:beam])
        parents.append(par)
        layer = nxt
    order: list[int] = []
    state = g.full
    peak = layer[state][0] if g.n else 0
    for par in reversed(parents):
        state, i = par[state]
        order.append(i)
    return order[::-1], peak, exact


def _list_schedule(g: _Graph, rank: Callable[..., tuple]) -> list[int]:
    """A greedy schedule: repeatedly run the ready step of least
    rank(step, bytes during it, live before, live after, position of each step run so far)."""
    done = live = 0
    ready = g.initial_ready()
    order: list[int] = []
    pos: dict[int, int] = {}
    while ready:
        best = None
        for i in _bits(ready):
            during, live2, ready2 = g.advance(done, i, live, ready)
            key = rank(i, during, live, live2, pos)
            if best is None or key < best[0]:
                best = (key, i, live2, ready2)
        _, i, live, ready = best
        pos[i] = len(order)
        order.append(i)
        done |= 1 << i
    return order


def _heuristic_orders(g: _Graph) -> list[list[int]]:
    """A few cheap schedules: least bytes during the step; most bytes freed; depth first (the step
    reading the most recently written buffer)."""
    def depth_first(i, during, live, after, pos):
        recent = max((pos[g.writer[r]] for r in g.reads[i] if r in g.writer), default=-1)
        return (-recent, after - live, i)

    return [
        _list_schedule(g, lambda i, during, live, after, pos: (during, after, i)),
        _list_schedule(g, lambda i, during, live, after, pos: (after - live, during, i)),
        _list_schedule(g, depth_first),
    ]


def _static_lower_bound(g: _Graph) -> int:
    """Bytes some step needs in any schedule: its arena inputs, output and scratch (an in-place
    input counted once with the output)."""
    bound = 0
    for i in range(g.n):
        reads = sum(g.size[r] for r in g.arena_reads[i])
        saving = max((min(g.size[r], g.out_size[i]) for r in g.inplace_ok[i]), default=0)
        bound = max(bound, reads + g.out_size[i] + g.scratch[i] - saving)
    return bound


def _search(g: _Graph, align: int, node_limit: int) -> tuple[_Layout, bool]:
    """The best layout over schedules and placements; exact when the search was exhaustive."""
    configs = [(False, "size")] + [(True, kind) for kind in PLACEMENTS] + [(False, k) for k in PLACEMENTS[1:]]
    given = list(range(g.n))
    best = _layout(g, given, align, configs)
    dp_order, min_peak, dp_exact = _min_peak_order(g)
    lower = _align_up(max(_static_lower_bound(g), min_peak if dp_exact else 0), align)
    seen = {tuple(given)}
    for order in [dp_order, *_heuristic_orders(g)]:
        if best.arena <= lower:
            return best, True
        if tuple(order) in seen:
            continue
        seen.add(tuple(order))
        found = _layout(g, order, align, configs, cutoff=best.arena)
        if found is not None:
            best = found
    if best.arena <= lower:
        return best, True
    if g.n > EXACT_STEPS:
        return best, False

    # branch and bound over all topological orders; a prefix's peak live bytes bounds the arena
    nodes = 0
    complete = True
    prefix: list[int] = []

    def dfs(done: int, live: int, peak: int, ready: int) -> None:
        nonlocal best, nodes, complete
        if not complete or best.arena <= lower:
            return
        if done == g.full:
            nodes += LEAF_COST
            found = _layout(g, prefix, align, configs, cutoff=best.arena)
            if found is not None:
                best = found
            return
        nodes += 1
        if nodes > node_limit:
            complete = False
            return
        children = []
        for i in _bits(ready):
            during, live2, ready2 = g.advance(done, i, live, ready)
            peak2 = max(peak, during)
            if _align_up(peak2, align) < best.arena:
                children.append((peak2, live2, i, ready2))
        children.sort()
        for peak2, live2, i, ready2 in children:
            if _align_up(peak2, align) >= best.arena:
                break
            prefix.append(i)
            dfs(done | (1 << i), live2, peak2, ready2)
            prefix.pop()

    dfs(0, 0, 0, g.initial_ready())
    return best, complete or best.arena <= lower


# ---------------------------------------------------------------------------------------------
# public API


def plan_memory(sizes: dict[str, int], steps: list[Step], external: set[str] = frozenset(), strategy: str = "lrcc",
                align: int = 4, node_limit: int = NODE_LIMIT) -> MemoryPlan:
    """Plan the arena of `steps`: an offset for every non-external buffer and step scratch,
    and (strategy "lrcc") the schedule that makes the arena smallest."""
    if strategy not in STRATEGIES:
        raise LrccError(f"memory plan: unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if isinstance(align, bool) or not isinstance(align, int) or align < 1:
        raise LrccError(f"memory plan: align must be a positive integer, not {align!r}")
    g = _Graph(sizes, steps, external)
    given = list(range(g.n))
    exact = False
    if strategy == "naive":
        layout = _naive(g, given, align)
    elif strategy == "greedy":
        layout = _layout(g, given, align, [(False, "size")])
    else:
        layout, exact = _search(g, align, node_limit)
    return MemoryPlan(
        strategy=strategy,
        order=layout.order,
        offsets=layout.offsets,
        sizes=layout.sizes,
        lifetimes=layout.life,
        arena_bytes=layout.arena,
        shared=layout.shared,
        align=align,
        peak_live=g.peak_live(layout.order, layout.shared),
        exact=exact,
        step_names=[st.name for st in g.steps],
    )


def check_plan(plan: MemoryPlan, steps: list[Step], external: Iterable[str] = frozenset()) -> None:
    """Raise LrccError unless `plan` is a valid arena plan for `steps`: a topological order, every
    arena buffer aligned and inside the arena, and no two buffers live at the same step sharing a
    byte (other than an in-place output over the input it took over)."""
    g = _Graph(plan.sizes, steps, external)
    g.check_order(list(plan.order))
    life = g.lifetimes(list(plan.order))

    def at(p: int) -> str:
        return steps[plan.order[p]].name

    for key in life:
        if key not in plan.offsets:
            raise LrccError(f"memory plan: buffer {key!r} has no arena offset")
        if key not in plan.sizes or plan.sizes[key] != g.buffer_size(key):
            raise LrccError(f"memory plan: buffer {key!r} has size {plan.sizes.get(key)!r} in the plan, "
                            f"but the step needs {g.buffer_size(key)}")
        if plan.lifetimes.get(key) != life[key]:
            raise LrccError(f"memory plan: buffer {key!r} is recorded live over {plan.lifetimes.get(key)}, "
                            f"but the order makes it live over {life[key]}")
    for key in plan.offsets:
        if key not in life:
            kind = "external buffer" if key in g.external else "buffer no step uses"
            raise LrccError(f"memory plan: {kind} {key!r} was given an arena offset")
    for key, (first, _) in life.items():
        off, size = plan.offsets[key], plan.sizes[key]
        if off < 0 or off % plan.align:
            raise LrccError(f"memory plan: buffer {key!r} (written at step {at(first)!r}) has offset {off}, "
                            f"not a non-negative multiple of {plan.align}")
        if off + size > plan.arena_bytes:
            raise LrccError(f"memory plan: buffer {key!r} (written at step {at(first)!r}) spans [{off}, {off + size}), "
                            f"past the end of the {plan.arena_bytes}-byte arena")

    for out, inp in plan.shared.items():
        if out not in life or inp not in life or out not in g.writer:
            raise LrccError(f"memory plan: in-place pair {out!r} <- {inp!r} names a buffer that is not in the arena")
        i = g.writer[out]
        p = life[out][0]
        if inp not in g.inplace_ok[i]:
            raise LrccError(f"memory plan: step {steps[i].name!r} may not write {out!r} in place of {inp!r} "
                            "(not one of its in-place inputs)")
        if life[inp][1] != p:
            raise LrccError(f"memory plan: step {steps[i].name!r} writes {out!r} in place of {inp!r}, "
                            f"but {inp!r} is still read at step {at(life[inp][1])!r}")
        if plan.offsets[out] != plan.offsets[inp]:
            raise LrccError(f"memory plan: in-place output {out!r} of step {steps[i].name!r} is at offset "
                            f"{plan.offsets[out]}, not at the offset {plan.offsets[inp]} of {inp!r}")

    spans = sorted((plan.offsets[k], plan.offsets[k] + plan.sizes[k], k) for k in life if plan.sizes[k] > 0)
    for a, (a_lo, a_hi, ka) in enumerate(spans):
        for b_lo, b_hi, kb in spans[a + 1:]:
            if b_lo >= a_hi:
                break
            first = max(life[ka][0], life[kb][0])
            if first > min(life[ka][1], life[kb][1]):
                continue
            if plan.shared.get(ka) == kb or plan.shared.get(kb) == ka:
                continue
            raise LrccError(f"memory plan: buffers {ka!r} [{a_lo}, {a_hi}) and {kb!r} [{b_lo}, {b_hi}) overlap in "
                            f"the arena while both are live at step {at(first)!r} (position {first})")


_SYMBOLS = ("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
            "#$%&*+=@?!~^<>/\\()[]{}:;,_'\"`")


def _symbols(plan: MemoryPlan, keys: list[str]) -> dict[str, str]:
    """A symbol per buffer: unique where there are enough, else unique among buffers live together."""
    if len(keys) <= len(_SYMBOLS):
        return {k: _SYMBOLS[j] for j, k in enumerate(keys)}
    symbol: dict[str, str] = {}
    busy: list[tuple[int, str]] = []  # (last, symbol) of buffers placed so far
    for k in sorted(keys, key=lambda k: plan.lifetimes[k]):
        first, last = plan.lifetimes[k]
        taken = {s for end, s in busy if end >= first}
        symbol[k] = next(s for s in _SYMBOLS if s not in taken)
        busy.append((last, symbol[k]))
    return symbol


def ascii_map(plan: MemoryPlan, width: int = 64) -> str:
    """The arena over the schedule as text: one row per step, a symbol wherever a buffer is live,
    a byte scale on top and a legend (symbol, buffer, offset, size, lifetime) below."""
    width = max(8, int(width))
    arena = plan.arena_bytes
    keys = sorted((k for k in plan.lifetimes if plan.sizes.get(k, 0) > 0),
                  key=lambda k: (plan.lifetimes[k][0], plan.offsets[k], k))
    symbol = _symbols(plan, keys)
    labels = [plan.step_names[i] if i < len(plan.step_names) else f"step {i}" for i in plan.order]
    label_w = min(24, max([len(x) for x in labels] + [4]))
    indent = " " * (5 + label_w + 1)

    per_col = arena / width if arena else 0
    lines = [(f"arena {arena} bytes ({plan.strategy}, {len(plan.order)} steps, "
              f"peak live {plan.peak_live} bytes); one column = {per_col:.4g} bytes")]
    # the byte scale: a row's left '|' is byte 0, its right '|' the arena's end
    scale = [" "] * (width + 2)
    ruler = ["-"] * (width + 2)
    for t in (0, width // 4, width // 2, 3 * width // 4):
        text = str(arena * t // width)
        scale[t:t + len(text)] = list(text)
        ruler[t] = "+"
    end = str(arena)
    scale[width + 2 - len(end):] = list(end)
    ruler[width + 1] = "+"
    lines.append(indent + "".join(scale[:width + 2]).rstrip())
    lines.append(indent + "".join(ruler))

    for p, label in enumerate(labels):
        cells = ["."] * width
        live = [k for k in keys if plan.lifetimes[k][0] <= p <= plan.lifetimes[k][1]]
        # large first so a small buffer sharing a column stays visible; a newer buffer over an older
        live.sort(key=lambda k: (-plan.sizes[k], plan.lifetimes[k][0]))
        for k in live:
            lo = plan.offsets[k] * width // arena
            hi = max(lo + 1, -(-(plan.offsets[k] + plan.sizes[k]) * width // arena))
            for c in range(lo, min(hi, width)):
                cells[c] = symbol[k]
        lines.append(f"{p:>4} {label[:label_w]:<{label_w}} |{''.join(cells)}|")

    lines.append("legend:")
    for k in keys:
        first, last = plan.lifetimes[k]
        off, size = plan.offsets[k], plan.sizes[k]
        note = f", in place of {plan.shared[k]}" if k in plan.shared else ""
        lines.append(f"  {symbol[k]}  {k}: bytes [{off}, {off + size}) size {size}, "
                     f"live at steps {first}..{last}{note}")
    empty = [k for k in plan.lifetimes if plan.sizes.get(k, 0) == 0]
    if empty:
        lines.append(f"  (empty buffers: {', '.join(sorted(empty))})")
    return "\n".join(lines) + "\n"
