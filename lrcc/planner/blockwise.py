"""Block by block compression, for models larger than memory.

`compile_blockwise` factorises the linear layers of a model whose body is a list of blocks
(transformer layers), one block at a time, so that peak memory grows with the largest block and
the calibration activations, not with the model:

  1. capture   run the calibration batches up to the first block and keep its inputs (hidden
               states and the other arguments: masks, positions);
  2. for each block, streamed from the checkpoint (safetensors) and released after:
     a. statistics: run the original block on the compressed model's hidden states, summing for
        every linear layer its input covariance A = X^T X (shared by layers fed one tensor, and
        for m > n) or else its output covariance C = Y^T Y;
     b. factorise: one job per layer (lrcc.planner.workers: in this process or on torch.distributed
        workers), giving each layer's output-space spectrum and leading directions;
     c. allocate: the block's ranks by the exact multiple-choice knapsack of lrcc.planner.solve:
        least summed relative output error of the layers within the params budget, which every
        block meets on its own;
     d. apply: W ~ U_r (U_r^T W), stored as the factors U (m x r) and V = U_r^T W (r x n); run the
        compressed block to get the next block's inputs; write the block's shard.
  3. verify    the held-out calibration batches go through the original and the compressed model
               side by side, block by block; the output error is recorded, and max_error enforced.

Only one block's weights are resident at a time (plus the modules before the first block while
capturing, and after the last while verifying). Weights come from a safetensors checkpoint (one
file, a directory of shards, or a sharded model's index.json); without one, from the model itself
(the in-memory path), through the same code, so the two give the same result bit for bit.

The model's forward must call its blocks one after another, each taking the hidden state as its
first positional argument and returning it (alone, or first in a tuple).
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..budget import Budget
from ..errors import BudgetError, CalibrationError, LrccError
from ..rewrites.low_rank import candidate_ranks
from ..ir.serialize import save_weights
from .calibrate import check_batches, flat_outputs, split_holdout
from .solve import Option, solve
from .workers import FactorJob, FactorResult, make_pool

PLAN_FILE = "blockwise.json"
INDEX_FILE = "model.safetensors.index.json"
FORMAT = "lrcc-blockwise"
VERSION = 1


# ---- where the weights come from ------------------------------------------------------------

class Checkpoint:
    """The tensors of a safetensors checkpoint, by state-dict key, read on demand.

    path: a .safetensors file, a directory of them, or a sharded checkpoint's index.json. Each read
    opens the files it needs and closes them again, so nothing stays mapped between reads.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        from safetensors import safe_open
        p = Path(path)
        if p.is_dir():
            index = p / INDEX_FILE
            files = [index] if index.is_file() else sorted(p.glob("*.safetensors"))
            if not files:
                raise LrccError(f"checkpoint {p}: the directory holds no .safetensors files and no {INDEX_FILE}")
        elif p.is_file():
            files = [p]
        else:
            raise LrccError(f"checkpoint {p}: no such file or directory")
        self.where: dict[str, str] = {}
        for f in files:
            if f.name.endswith(".json"):
                try:
                    weight_map = json.loads(f.read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise LrccError(f"checkpoint {f}: not a safetensors index (a JSON object with a weight_map): {e}") from None
                for key, shard in sorted(weight_map.items()):
                    self.where[key] = str(f.parent / shard)
                continue
            try:
                with safe_open(str(f), framework="pt") as h:
                    for key in h.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                        self.where[key] = str(f)
            except Exception as e:  # safetensors raises its own error types for damaged files
                raise LrccError(f"checkpoint {f}: cannot read it as safetensors ({e})") from None
        self.path = p

    def file_of(self, key: str) -> str | None:
        return self.where.get(key)

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open
        out: dict[str, torch.Tensor] = {}
        by_file: dict[str, list[str]] = {}
        for k in keys:
            if k not in self.where:
                raise LrccError(f"checkpoint {self.path}: has no tensor {k!r} (the model expects it); is it the "
                                "checkpoint of this model?")
            by_file.setdefault(self.where[k], []).append(k)
        for f, ks in by_file.items():
            try:
                with safe_open(f, framework="pt") as h:
                    for k in ks:
                        out[k] = h.get_tensor(k)
            except LrccError:
                raise
            except Exception as e:
                raise LrccError(f"checkpoint {f}: cannot read {ks[0]!r} ({e})") from None
        return out


class InMemory:
    """The tensors of a model that is already in memory (its state dict, not copied)."""

    def __init__(self, model: nn.Module) -> None:
        self.tensors = {k: v.detach() for k, v in model.state_dict(keep_vars=True).items()}
        self.path = "the model in memory"

    def file_of(self, key: str) -> str | None:
        return None

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        missing = [k for k in keys if k not in self.tensors]
        if missing:
            raise LrccError(f"the model has no tensor {missing[0]!r}")
        return {k: self.tensors[k] for k in keys}


# ---- the working copy of the model ----------------------------------------------------------

def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of the model whose parameters and persistent buffers are on the meta device (no
    memory); other buffers (non-persistent: computed in __init__) are copied as they are."""
    memo: dict[int, Any] = {}
    persistent = set(model.state_dict(keep_vars=True))
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        if name in persistent and id(t) not in memo:
            meta = torch.empty_like(t, device="meta")
            memo[id(t)] = nn.Parameter(meta, requires_grad=False) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def find_blocks(model: nn.Module, name: str | None) -> tuple[str, nn.ModuleList]:
    """The model's list of blocks: the ModuleList called `name`, or else the one holding the most
    parameters."""
    if name is not None:
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise LrccError(f"blocks={name!r}: the model has no submodule of that name") from None
        if not isinstance(mod, (nn.ModuleList, nn.Sequential)) or len(mod) == 0:
            raise LrccError(f"blocks={name!r} is a {type(mod).__name__}, not a non-empty ModuleList of blocks")
        return name, mod
    best = None
    for n, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0:
            size = sum(p.numel() for p in m.parameters())
            if best is None or size > best[0]:
                best = (size, n, m)
    if best is None:
        raise LrccError(f"{type(model).__name__} has no nn.ModuleList of blocks; blockwise compilation needs the model's "
                        "body as a list of blocks (transformer layers); pass blocks='name.of.the.list'")
    return best[1], best[2]


def _direct_tensors(module: nn.Module) -> list[tuple[str, str]]:
    """(kind, name) of the module's own parameters and persistent buffers."""
    out = [("param", n) for n, p in module._parameters.items() if p is not None]
    skip = getattr(module, "_non_persistent_buffers_set", set())
    out += [("buffer", n) for n, b in module._buffers.items() if b is not None and n not in skip]
    return out


def materialize(module: nn.Module, prefix: str, source, skip: frozenset[str] = frozenset()) -> int:
    """Load every meta tensor of `module` (recursively) from `source`, except the keys in `skip`;
    returns the bytes loaded."""
    wanted: list[tuple[nn.Module, str, str, str]] = []
    for sub_name, sub in module.named_modules():
        for kind, n in _direct_tensors(sub):
            t = getattr(sub, n)
            key = prefix + (sub_name + "." if sub_name else "") + n
            if t.device.type == "meta" and key not in skip:
                wanted.append((sub, kind, n, key))
    got = source.read([k for *_, k in wanted])
    total = 0
    for sub, kind, n, key in wanted:
        t = got[key]
        old = getattr(sub, n)
        if tuple(t.shape) != tuple(old.shape):
            raise LrccError(f"{source.path}: tensor {key!r} has shape {tuple(t.shape)} but the model's is "
                            f"{tuple(old.shape)}; is it the checkpoint of this model?")
        if t.dtype != old.dtype:
            t = t.to(old.dtype)
        if kind == "param":
            sub._parameters[n] = nn.Parameter(t, requires_grad=False)
        else:
            sub._buffers[n] = t
        total += t.numel() * t.element_size()
    return total


def release(module: nn.Module) -> None:
    """Put every parameter and persistent buffer of `module` back on the meta device."""
    for sub in module.modules():
        release_direct(sub)


class LowRankLinear(nn.Module):
    """y = (x V^T) U^T + b: a rank-r linear layer, V r x n, U m x r."""

    def __init__(self, v: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.v = nn.Parameter(v, requires_grad=False)
        self.u = nn.Parameter(u, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.in_features, self.out_features, self.rank = v.shape[1], u.shape[0], v.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(nn.functional.linear(x, self.v), self.u, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


class _Stop(Exception):
    pass


class _Replay(nn.Module):
    """Stands in for block j when running the model around its blocks: passes the hidden state on
    (or, for the last block, returns the stored one), shaped like the real block's output."""

    def __init__(self, hidden: Callable[[], torch.Tensor] | None, tuple_out: int) -> None:
        super().__init__()
        self.hidden, self.tuple_out = hidden, tuple_out

    def forward(self, x, *args, **kwargs):
        h = x if self.hidden is None else self.hidden()
        return (h,) + (None,) * (self.tuple_out - 1) if self.tuple_out else h


@contextlib.contextmanager
def _lazy_outside(model: nn.Module, blocks: nn.ModuleList, source):
    """Modules outside the blocks load their weights when first called, and are released after.
    The root module's own tensors (used directly by its forward, never called) load at once."""
    inside = {id(m) for m in blocks.modules()}
    hooks, loaded = [], []

    def load(m: nn.Module, prefix: str) -> None:
        if any(getattr(m, n).device.type == "meta" for _, n in _direct_tensors(m)):
            materialize_direct(m, prefix, source)
            loaded.append(m)

    for name, mod in model.named_modules():
        if id(mod) in inside or not _direct_tensors(mod):
            continue
        prefix = name + "." if name else ""
        if mod is model:
            load(mod, prefix)
        else:
            hooks.append(mod.register_forward_pre_hook(lambda m, args, prefix=prefix: load(m, prefix)))
    try:
        yield
    except (RuntimeError, NotImplementedError) as e:
        if "meta" not in str(e):
            raise
        raise LrccError("the model's forward used a weight outside its blocks without calling the module that owns "
                        f"it ({e}); blockwise compilation loads a module's weights when the module is called") from None
    finally:
        for h in hooks:
            h.remove()
        for m in loaded:
            release_direct(m)


def materialize_direct(module: nn.Module, prefix: str, source) -> None:
    """materialize() for the module's own tensors only (not its children's)."""
    wanted = [(kind, n, prefix + n) for kind, n in _direct_tensors(module) if getattr(module, n).device.type == "meta"]
    got = source.read([k for *_, k in wanted])
    for kind, n, key in wanted:
        t = got[key]
        if kind == "param":
            module._parameters[n] = nn.Parameter(t, requires_grad=False)
        else:
            module._buffers[n] = t


# ---- the report -----------------------------------------------------------------------------

@dataclass
class BlockwiseReport:
    rows: list[dict[str, Any]]
    totals: dict[str, Any]
    budget: str
    notes: list[str] = field(default_factory=list)
    verification: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self, timings: bool = True) -> str:
        d = {"format": FORMAT, "budget": self.budget, "rows": self.rows, "totals": self.totals,
             "verification": self.verification, "notes": self.notes}
        if timings:
            d["timings"] = self.timings
        return json.dumps(d, indent=1)

    def text(self, timings: bool = True) -> str:
        t = self.totals
        lines = [f"lrcc blockwise report: budget {self.budget}; {t['blocks']} blocks, {len(self.rows)} linear layers"]
        w = max([len(r["site"]) for r in self.rows] + [4])
        lines.append(f"{'site'.ljust(w)}  {'choice':>10}  {'params':>12}  {'after':>12}  {'layer error':>11}")
        for r in self.rows:
            lines.append(f"{r['site'].ljust(w)}  {r['choice']:>10}  {r['params_before']:>12,}  {r['params_after']:>12,}  "
                         f"{r['error']:>11.2e}")
        lines.append(f"{'TOTAL'.ljust(w)}  {t['params_after'] / max(t['params_before'], 1):>7.3f} of  "
                     f"{t['params_before']:>12,}  {t['params_after']:>12,}")
        lines.append("layer error: the share of the layer's output energy on calibration data the factorisation drops")
        v = self.verification
        if v:
            lines.append(f"measured output error on {v['data']}: relative squared error {v['rel_error']:.3e}, "
                         f"cosine mean {v['cosine_mean']:.4f} (p5 {v['cosine_p5']:.4f}) over {v['samples']} samples")
        lines += [f"note: {n}" for n in self.notes]
        if timings and self.timings:
            lines.append("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.timings.items() if k.endswith("_s")))
            if "peak_rss_bytes" in self.timings:
                lines.append(f"peak RSS: {self.timings['peak_rss_bytes'] / 2**20:.0f} MiB")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.text()


@dataclass
class BlockwiseResult:
    """What compile_blockwise wrote: the directory, its report, and the chosen ranks by layer."""

    path: Path
    report: BlockwiseReport
    ranks: dict[str, int]

    def load(self, model: nn.Module) -> nn.Module:
        return load_blockwise(model, self.path)


def heap_returns_large_blocks() -> None:
    """Have glibc's malloc serve every allocation of 1 MiB or more by mmap, so that freeing it gives
    the memory back at once (M_MMAP_THRESHOLD; the default threshold rises with use, after which
    freed tensors of up to 32 MiB stay in the heap, fragmented, and the footprint creeps up block
    after block). Process-wide; a no-op where the C library has no mallopt."""
    try:
        import ctypes
        ctypes.CDLL(None).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = -3
    except (OSError, AttributeError):
        pass


def trim_heap() -> None:
    """Give freed heap memory back to the system (glibc's malloc_trim): a block's worth of freed
    tensors below malloc's mmap threshold otherwise stays resident and the footprint creeps up
    block after block. A no-op where the C library has no malloc_trim."""
    try:
        import ctypes
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far: VmHWM from /proc/self/status where there is
    one (getrusage's ru_maxrss is not reset by exec on Linux, so a process started by a large
    parent would report the parent's peak), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import sys
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux kilobytes
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


# ---- the compile ----------------------------------------------------------------------------

def _params_fraction(budget) -> float:
    bud = Budget.coerce(budget)
    if bud is None or bud.params is None:
        raise BudgetError("compile_blockwise: give a params budget, e.g. budget=0.5 or 'params=0.5' (the fraction of "
                          "the linear layers' parameters to keep)")
    other = [k for k in ("bytes", "latency", "sram", "flash") if getattr(bud, k) is not None]
    if other:
        raise BudgetError(f"compile_blockwise: budget {', '.join(other)} is not supported blockwise (it plans "
                          "parameters, block by block); use lrcc.compile for that budget")
    return bud


def _call_block(block: nn.Module, h: torch.Tensor, rest: tuple, kwargs: dict) -> tuple[torch.Tensor, int]:
    out = block(h, *rest, **kwargs)
    if isinstance(out, torch.Tensor):
        return out, 0
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0], len(out)
    raise LrccError(f"a block returned {type(out).__name__}; blockwise compilation needs blocks that return the hidden "
                    "state (a tensor, or a tuple whose first item is it)")


def compile_blockwise(model: nn.Module, calibration: Iterable[tuple], out: str | os.PathLike, *,
                      budget: Budget | float | str = 0.5, checkpoint: str | os.PathLike | None = None,
                      blocks: str | None = None, workers: int = 0, init_method: str | None = None,
                      rank_step: int = 8, holdout: float = 0.125, strict: bool = True,
                      progress: "bool | Callable[[str], None]" = False) -> BlockwiseResult:
    """Factorise the linear layers of `model` block by block, streaming weights; write the result to `out`.

    model: the model. With `checkpoint` (a safetensors file, a directory of shards or an index.json)
    its weights are read from there, a block at a time, and the model may live on the meta device
    (build it under `with torch.device("meta"):`). Without, its own weights are used.
    calibration: input tuples for the model's forward; 1 in 8 batches is held out to verify.
    budget: the fraction of the linear layers' parameters to keep, in every block (a params Budget,
    optionally with max_error, enforced on the held-out batches unless strict=False).
    workers: 0 factorises in this process; N >= 1 on N torch.distributed worker processes (one
    thread each; identical results). init_method "tcp://host:port" with workers N waits for N
    workers started elsewhere with `lrcc worker` instead of spawning them.
    Writes out/: the compressed weights as safetensors shards with an index, blockwise.json (the
    ranks), report.json/.txt and timings.json. Returns a BlockwiseResult; result.load(model) gives
    the compressed model in memory. (It sets glibc's mmap threshold to 1 MiB in this process, so
    that freed blocks go back to the system at once: see heap_returns_large_blocks.)
    """
    t_start = time.perf_counter()
    heap_returns_large_blocks()
    bud = _params_fraction(budget)
    keep = bud.params
    if isinstance(rank_step, bool) or not isinstance(rank_step, int) or rank_step < 1:
        raise LrccError(f"rank_step={rank_step!r}: expected a whole number >= 1")
    if not isinstance(model, nn.Module):
        raise LrccError(f"compile_blockwise: expected a torch.nn.Module, got {type(model).__name__}")
    say = (lambda msg: print(f"[lrcc blockwise] {msg}", flush=True)) if progress is True else (progress or None)
    source = Checkpoint(checkpoint) if checkpoint is not None else InMemory(model)
    if checkpoint is None and any(t.device.type == "meta" for t in model.state_dict().values()):
        raise LrccError("compile_blockwise: the model's weights are on the meta device; pass checkpoint= (the "
                        "safetensors file or directory to stream them from)")
    work = meta_copy(model).eval()
    blocks_name, blist = find_blocks(work, blocks)
    cal = [tuple(b) if isinstance(b, (tuple, list)) else (b,) for b in calibration]
    if not cal:
        raise CalibrationError("calibration: no batches given")
    batches = check_batches(cal, len(cal[0]))
    fit, held, held_what = split_holdout(batches, holdout)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    notes: list[str] = []

    # 1. capture the first block's inputs
    t0 = time.perf_counter()
    captured: list[tuple[tuple, dict]] = []

    def catch(mod, args, kwargs):
        if not args or not isinstance(args[0], torch.Tensor):
            raise LrccError(f"{blocks_name}[0] was called without the hidden state as its first positional argument; "
                            "blockwise compilation needs blocks called as block(hidden, ...)")
        captured.append((args, kwargs))
        raise _Stop

    def capture(batch_list):
        captured.clear()
        hook = blist[0].register_forward_pre_hook(catch, with_kwargs=True)
        try:
            with _lazy_outside(work, blist, source), torch.no_grad():
                for b, batch in enumerate(batch_list):
                    try:
                        work(*batch)
                    except _Stop:
                        continue
                    raise LrccError(f"calibration batch {b}: the model's forward returned without calling "
                                    f"{blocks_name}[0]")
        finally:
            hook.remove()
        return [(a[0], a[1:], k) for a, k in captured]

    fit_in = capture(fit)
    held_in = capture(held) if held is not fit else fit_in
    held_orig = [h for h, _, _ in held_in]
    held_comp = list(held_orig)
    fit_h = [h for h, _, _ in fit_in]
    # keep only the other arguments (masks, positions): the hidden states live on in fit_h / held_*
    fit_in = [(None, rest, kw) for _, rest, kw in fit_in]
    held_in = fit_in if held is fit else [(None, rest, kw) for _, rest, kw in held_in]
    timings["capture_s"] = time.perf_counter() - t0
    if say:
        say(f"captured the inputs of {blocks_name}[0] for {len(fit)} fitting and {len(held)} held-out batches")

    rows: list[dict[str, Any]] = []
    ranks: dict[str, int] = {}
    index: dict[str, str] = {}
    tuple_out = 0
    t_stats = t_factor = t_apply = job_seconds = 0.0
    resident = 0
    pool = make_pool(workers, init_method)
    try:
        for i, block in enumerate(blist):
            prefix = f"{blocks_name}.{i}."
            # 2a. statistics on the original block, fed the compressed model's hidden states
            t0 = time.perf_counter()
            resident = max(resident, materialize(block, prefix, source))
            sites = _sites(block, prefix, rank_step)
            stats, sides = _statistics(block, sites, fit_in, fit_h)
            with torch.no_grad():
                new_held_orig = []
                for h, (_, rest, kw) in zip(held_orig, held_in):
                    y, tuple_out = _call_block(block, h, rest, kw)
                    new_held_orig.append(y)
            held_orig = new_held_orig
            jobs = []
            for name, mod in sites:
                m, n = mod.weight.shape
                key = prefix + name + ".weight"
                f = source.file_of(key)
                jobs.append(FactorJob(prefix + name, sides[name], stats[name], _max_rank(m, n, rank_step), (m, n),
                                      weight=None if f else mod.weight.detach(), source=(f, key) if f else None))
            del stats
            release(block)  # jobs read their weights from the source; nothing of the block stays resident
            trim_heap()
            t_stats += time.perf_counter() - t0

            # 2b. factorise
            t0 = time.perf_counter()
            results = pool.map(jobs, (lambda k, r, i=i: say(f"{blocks_name}[{i}]: factorised {r.site} "
                                                        f"({r.seconds:.1f} s)")) if say else None)
            del jobs
            job_seconds += sum(r.seconds for r in results)
            t_factor += time.perf_counter() - t0

            # 2c. allocate the block's ranks, 2d. apply
            t0 = time.perf_counter()
            chosen = _allocate(block, sites, results, keep, rank_step, f"{blocks_name}[{i}]")
            # the block again, less the weights about to be factorised: those are read one at a time
            factorised = frozenset(prefix + name + ".weight" for name, _ in sites if chosen[name] is not None)
            materialize(block, prefix, source, skip=factorised)
            rows += _apply(block, sites, results, chosen, prefix, i, source, ranks)
            del results
            with torch.no_grad():
                fit_h = [_call_block(block, h, rest, kw)[0] for h, (_, rest, kw) in zip(fit_h, fit_in)]
                held_comp = [_call_block(block, h, rest, kw)[0] for h, (_, rest, kw) in zip(held_comp, held_in)]
            shard = f"block-{i:05d}.safetensors"
            tensors = {prefix + k: v.detach().contiguous() for k, v in block.state_dict().items()}
            _write(out_dir / shard, tensors)
            index.update({k: shard for k in tensors})
            del tensors
            release(block)
            trim_heap()
            t_apply += time.perf_counter() - t0
            if say:
                say(f"{blocks_name}[{i}] done: {sum(1 for n, _ in sites if chosen[n] is not None)}/{len(sites)} layers "
                    f"factorised")
    finally:
        pool.close()
    timings.update(statistics_s=t_stats, factorisation_s=t_factor, apply_s=t_apply, factorisation_job_s=job_seconds)

    # everything outside the blocks, copied a module at a time
    t0 = time.perf_counter()
    inside = {id(m) for m in blist.modules()}
    for name, mod in work.named_modules():
        if id(mod) in inside or not _direct_tensors(mod):
            continue
        pre = name + "." if name else ""
        materialize_direct(mod, pre, source)
        tensors = {pre + n: getattr(mod, n).detach().contiguous() for _, n in _direct_tensors(mod)}
        shard = f"other-{(name or 'root').replace('.', '-')}.safetensors"
        _write(out_dir / shard, tensors)
        index.update({k: shard for k in tensors})
        release_direct(mod)
        del tensors

    # 3. verify on the held-out batches: the model around its blocks, fed the two final hidden states
    measured = _verify(work, blist, blocks_name, held, held_orig, held_comp, tuple_out, source)
    measured["data"] = held_what
    timings["verify_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start
    timings["peak_rss_bytes"] = float(peak_rss_bytes())
    timings["largest_block_bytes"] = float(resident)

    params_before = sum(r["params_before"] for r in rows)
    params_after = sum(r["params_after"] for r in rows)
    totals = {"blocks": len(blist), "params_before": params_before, "params_after": params_after,
              "layers_factorised": len(ranks), "measured_error": measured["rel_error"]}
    notes.append(f"ranks allocated block by block: every block keeps at most {keep} of its linear layers' parameters")
    report = BlockwiseReport(rows, totals, str(bud), notes, measured, timings)
    if bud.max_error is not None and measured["rel_error"] > bud.max_error:
        if strict:
            raise LrccError(f"the compressed model's output error {measured['rel_error']:.3e} on {held_what} exceeds "
                            f"max_error={bud.max_error}; keep more parameters or give more calibration data\n{report}")
        report.notes.append(f"FLAGGED: measured error {measured['rel_error']:.3e} exceeds max_error={bud.max_error}")

    plan = {"format": FORMAT, "version": VERSION, "blocks": blocks_name, "budget": str(bud),
            "ranks": dict(sorted(ranks.items()))}
    (out_dir / PLAN_FILE).write_text(json.dumps(plan, indent=1, sort_keys=True) + "\n")
    (out_dir / INDEX_FILE).write_text(json.dumps({"metadata": {"format": FORMAT},
                                                  "weight_map": dict(sorted(index.items()))}, indent=1) + "\n")
    (out_dir / "report.json").write_text(report.to_json(timings=False) + "\n")
    (out_dir / "report.txt").write_text(report.text(timings=False) + "\n")
    (out_dir / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    if say:
        say(f"done in {timings['total_s']:.1f} s: {params_after / max(params_before, 1):.3f} of the linear parameters "
            f"kept, measured output error {measured['rel_error']:.3e}")
    return BlockwiseResult(out_dir, report, ranks)


def release_direct(module: nn.Module) -> None:
    """release() for the module's own tensors only (not its children's)."""
    for kind, n in _direct_tensors(module):
        t = getattr(module, n)
        if t.device.type != "meta":
            meta = torch.empty_like(t, device="meta")
            if kind == "param":
                module._parameters[n] = nn.Parameter(meta, requires_grad=False)
            else:
                module._buffers[n] = meta


def _max_rank(m: int, n: int, step: int) -> int:
    ranks = candidate_ranks(m, n, step)
    return max(ranks) if ranks else 0


def _sites(block: nn.Module, prefix: str, step: int) -> list[tuple[str, nn.Linear]]:
    return [(name, mod) for name, mod in block.named_modules()
            if type(mod) is nn.Linear and candidate_ranks(*mod.weight.shape, step)]


def _statistics(block: nn.Module, sites, fit_in, fit_h) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Per layer, summed over the batches (float32 sums of float32 products): the covariance of
    its inputs A ("in": layers fed one tensor, e.g. q, k, v, share one sum; and every layer with
    m > n), else of its outputs C ("out": m <= n, input not shared). One n x n or m x m matrix per
    distinct input or layer, the smaller where there is a choice."""
    # which layers share an input tensor: one forward of the first batch, recording identities
    seen: dict[str, torch.Tensor] = {}
    hooks = [mod.register_forward_hook(lambda module, args, output, name=name: seen.__setitem__(name, args[0]))
             for name, mod in sites]
    try:
        with torch.no_grad():
            h, (_, rest, kw) = fit_h[0], fit_in[0]
            _call_block(block, h, rest, kw)
    finally:
        for hk in hooks:
            hk.remove()
    shared_input = {name for name in seen if any(o != name and seen[o] is seen[name] for o in seen)}
    seen.clear()

    stats: dict[str, torch.Tensor] = {}
    sides = {name: "in" if (mod.weight.shape[0] > mod.weight.shape[1] or name in shared_input) else "out"
             for name, mod in sites}
    owner_of: dict[int, tuple[str, torch.Tensor]] = {}

    def make(name: str):
        side = sides[name]

        def hook(module, args, output):
            if side == "in":
                x = args[0]  # the tensor itself (detach() would make a new object each call)
                owner = owner_of.get(id(x))
                if owner is not None and owner[1] is x:
                    if owner[0] != name:
                        stats[name] = stats[owner[0]]  # the same input tensor: the same sums (q, k, v)
                    return
                owner_of[id(x)] = (name, x)  # the reference keeps x alive, so its id is not reused
                rows = x.detach().reshape(-1, x.shape[-1]).float()
            else:
                y = output.detach()
                if module.bias is not None:
                    y = y - module.bias
                rows = y.reshape(-1, y.shape[-1]).float()
            if not torch.isfinite(rows).all():
                raise CalibrationError(f"layer {name}: its {'input' if side == 'in' else 'output'} on calibration data "
                                       "contains NaN or Inf")
            if name in stats:
                stats[name].addmm_(rows.T, rows)  # in place: no second n x n matrix per batch
            else:
                stats[name] = rows.T @ rows
        return hook

    hooks = [mod.register_forward_hook(make(name)) for name, mod in sites]
    try:
        with torch.no_grad():
            for h, (_, rest, kw) in zip(fit_h, fit_in):
                owner_of.clear()
                _call_block(block, h, rest, kw)
            owner_of.clear()
    finally:
        for hk in hooks:
            hk.remove()
    return stats, sides


def _apply(block, sites, results: list, chosen: dict, prefix: str, i: int, source, ranks: dict) -> list[dict]:
    """Replace the block's chosen layers by LowRankLinear(U_r, U_r^T W), reading each weight once
    more; returns the report rows. (A function of its own, so nothing of it outlives the block.)"""
    rows = []
    for k, (name, mod) in enumerate(sites):
        res, results[k] = results[k], None  # the full basis is dropped as soon as it is used
        m, n = mod.weight.shape
        r = chosen[name]
        bias = mod.bias.detach() if mod.bias is not None else None
        b = 0 if bias is None else m
        lam = res.lam.double()
        total = float(lam.sum())
        err = float(lam[r:].sum()) / total if (r is not None and total > 0) else 0.0
        if r is not None:
            key = prefix + name + ".weight"
            w = source.read([key])[key]
            u = res.basis[:, :r].contiguous().clone()
            del res
            v = u.T @ w.float()
            del w
            _set_submodule(block, name, LowRankLinear(v.contiguous(), u, bias))
            ranks[prefix + name] = r
        rows.append({"site": prefix + name, "block": i, "choice": f"rank {r}" if r is not None else "keep",
                     "params_before": m * n + b, "params_after": (r * (m + n) if r is not None else m * n) + b,
                     "error": err})
    return rows


def _allocate(block, sites, results: list[FactorResult], keep: float, step: int, where: str) -> dict[str, int | None]:
    """The block's ranks: least summed relative layer error with the block's linear parameters <= keep."""
    options: dict[str, list[Option]] = {}
    total = 0.0
    for (name, mod), res in zip(sites, results):
        m, n = mod.weight.shape
        total += m * n
        lam = res.lam.double()
        energy = float(lam.sum())
        tail = lam.flip(0).cumsum(0).flip(0)
        opts = [Option(0.0, {"params": float(m * n)}, None)]
        for r in candidate_ranks(m, n, step):
            if r > res.basis.shape[1]:
                continue
            err = float(tail[r]) / energy if (energy > 0 and r < lam.numel()) else 0.0
            opts.append(Option(err, {"params": float(r * (m + n))}, r))
        options[name] = opts
    try:
        pick = solve(options, {"params": keep * total})
    except BudgetError as e:
        raise BudgetError(f"{where}: {e} (every block must meet the params budget on its own)") from None
    return {name: options[name][j].payload for name, j in pick.items()}


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_weights(tensors, path, {"format": FORMAT})


def _verify(work, blist, blocks_name, held, held_orig, held_comp, tuple_out, source) -> dict[str, float]:
    """Run the model around its blocks on the held-out batches, once with the original model's last
    hidden states and once with the compressed one's; compare the outputs."""
    outputs = {}
    for which, hidden in (("original", held_orig), ("compressed", held_comp)):
        saved = list(blist)
        box: dict[str, torch.Tensor] = {}
        for j in range(len(blist)):
            blist[j] = _Replay((lambda box=box: box["h"]) if j == len(blist) - 1 else None, tuple_out)
        ys = []
        try:
            with _lazy_outside(work, blist, source), torch.no_grad():
                for batch, h in zip(held, hidden):
                    box["h"] = h
                    ys.append(flat_outputs(work(*batch)).double())
        finally:
            for j, m in enumerate(saved):
                blist[j] = m
        outputs[which] = ys
    num = den = 0.0
    cos = []
    for y, y2 in zip(outputs["original"], outputs["compressed"]):
        num += float(((y2 - y) ** 2).sum())
        den += float((y ** 2).sum())
        cos.append(torch.nn.functional.cosine_similarity(y, y2, dim=1))
    c = torch.cat(cos)
    return {"rel_error": num / max(den, 1e-30), "cosine_mean": float(c.mean()),
            "cosine_p5": float(torch.quantile(c, 0.05)) if c.numel() > 1 else float(c.mean()),
            "samples": int(c.numel())}


# ---- loading the result ---------------------------------------------------------------------

def load_blockwise(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """The compressed model in memory: a copy of `model` (meta or not) with its factorised layers
    replaced by LowRankLinear and every weight read from `path` (written by compile_blockwise)."""
    p = Path(path)
    plan_file = p / PLAN_FILE
    if not plan_file.is_file():
        raise LrccError(f"load_blockwise: {plan_file} is missing; is {p} a directory written by compile_blockwise?")
    try:
        plan = json.loads(plan_file.read_text())
    except json.JSONDecodeError as e:
        raise LrccError(f"load_blockwise: {plan_file} is not valid JSON ({e})") from None
    if plan.get("format") != FORMAT or plan.get("version") != VERSION:
        raise LrccError(f"load_blockwise: {plan_file} is not a {FORMAT} plan of version {VERSION}")
    work = meta_copy(model).eval()
    for site, r in plan["ranks"].items():
        try:
            lin = work.get_submodule(site)
        except AttributeError:
            raise LrccError(f"load_blockwise: the plan factorises {site!r}, which the model does not have") from None
        m, n = lin.weight.shape
        bias = None if lin.bias is None else torch.empty(m, device="meta")
        _set_submodule(work, site, LowRankLinear(torch.empty(r, n, device="meta"), torch.empty(m, r, device="meta"), bias))
    materialize(work, "", Checkpoint(p))
    return work
