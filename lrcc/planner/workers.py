"""Factorisation jobs, and the pools that run them: in process, or on torch.distributed workers.

Factorising one linear layer needs only its weight and its calibration statistics, so the layers
of a block are independent jobs. A job is a plain function of its inputs, run with one thread, so
its result is the same bit for bit whichever process runs it: the in-process pool and any number
of workers give identical compressed models.

The distributed pool is built on torch.distributed's TCPStore, its key-value store over TCP: the
driver (the process that streams the model) serves it and queues each block's jobs in it, largest
first; workers claim the next job with an atomic counter, run it and write the result back. Local
workers are started as fresh processes; workers on other machines join with `lrcc worker --init
tcp://HOST:PORT --rank R --world-size N` (see docs/streaming.md). Results are read back by job
index, so the order of completion never shows in the result.
"""
from __future__ import annotations

import io
import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..errors import LrccError

# ---- the job --------------------------------------------------------------------------------

@dataclass
class FactorJob:
    """One linear layer to factorise. side "out": stat is the output covariance C = sum y y^T
    (m x m, y = W x); side "in": stat is the input covariance A = sum x x^T (n x n), and the job
    forms the smaller eigenproblem from it (C = W A W^T when m <= n). So it is k x k, k = min(m, n). weight is the m x n weight, or None with
    (checkpoint file, key) to read it from (workers read weights themselves, not over the wire)."""

    site: str
    side: str
    stat: torch.Tensor
    max_rank: int
    shape: tuple[int, int]  # the weight's (m, n)
    weight: torch.Tensor | None = None
    source: tuple[str, str] | None = None

    def cost(self) -> float:
        """Relative run time, for handing out the largest jobs first: the k x k eigenproblem, and
        for side "in" the products with W around it."""
        k = min(self.shape)
        return float(k) ** 3 * (1.6 if self.side == "in" else 1.0)


@dataclass
class FactorResult:
    """lam: the k eigenvalues of the output covariance restricted to W's row space, largest first
    (lam_i = sigma_i^2 of W L, L L^T = A): truncating to r terms leaves sum_{i>=r} lam_i of the
    layer's output energy sum(lam). basis: m x max_rank, the leading output directions U (float32),
    so that the rank-r layer is U_r (U_r^T W)."""

    site: str
    lam: torch.Tensor
    basis: torch.Tensor
    seconds: float


def _weight_of(job: FactorJob) -> torch.Tensor:
    if job.weight is not None:
        return job.weight
    if job.source is None:
        raise LrccError(f"layer {job.site}: the factorisation job has neither a weight nor a checkpoint source")
    from safetensors import safe_open
    path, key = job.source
    with safe_open(path, framework="pt") as f:
        return f.get_tensor(key)


def _cholesky_f32(stat: torch.Tensor, what: str) -> torch.Tensor:
    """The lower Cholesky factor of a PSD matrix, computed in float64 (damped by 1e-6 .. 1e-1 of its
    mean diagonal until it succeeds) and returned in float32; in place, so n x n float64 twice at most."""
    a = stat.double()
    a += a.T.clone()
    a *= 0.5
    scale = float(a.diagonal().mean()) or 1.0
    added = 0.0
    for damp in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1):
        a.diagonal().add_(damp * scale - added)
        added = damp * scale
        chol, info = torch.linalg.cholesky_ex(a)
        if int(info) == 0:
            return chol.float()
        del chol
    raise LrccError(f"layer {what}: its input covariance is not positive definite even with damping")


def run_job(job: FactorJob) -> FactorResult:
    """The output-space principal directions of W under its calibration inputs.

    Law (SVD-LLM, Wang et al. 2024, arXiv:2403.07378; the same optimum as ASVD-style output PCA):
    for inputs X with A = X^T X = L L^T, the best rank-r W' in ||X (W - W')^T||_F is
    trunc_r(W L) L^{-1} = U_r U_r^T W, with U_r the leading left singular vectors of W L, i.e. the
    leading eigenvectors of the output covariance C = W A W^T = Y^T Y.
    - m <= n: C (m x m), summed from the layer's outputs or formed as W A W^T; U = its eigenvectors.
    - m > n: the n x n problem M = L^T (W^T W) L = V S^2 V^T has C's nonzero eigenvalues, and
      U = W L V S^{-1}. Directions with S below 1e-6 of the largest carry under 1e-12 of the
      energy and are dropped (set to zero) rather than amplified.
    Float32 throughout (the Cholesky factor in float64, then rounded): a float64 eigenproblem of
    k = 4096 needs ~0.8 GB of workspace, float32 half, and the factors are stored in float32.
    """
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        r = job.max_rank
        if job.side == "out":
            stat = job.stat.float().clone()  # a copy: the job's own statistics stay as they are
            stat += stat.T.clone()
            stat *= 0.5
            lam, vec = torch.linalg.eigh(stat)
            del stat
            lam = lam.flip(0)
            basis = vec[:, vec.shape[1] - r:].flip(1)  # the leading r, largest first (eigh sorts ascending)
        elif job.side == "in" and job.shape[0] <= job.shape[1]:
            # a layer sharing its input (q, k, v): C = W A W^T, then as "out"
            w = _weight_of(job).float()
            stat = w @ job.stat.float() @ w.T
            del w
            stat += stat.T.clone()
            stat *= 0.5
            lam, vec = torch.linalg.eigh(stat)
            del stat
            lam = lam.flip(0)
            basis = vec[:, vec.shape[1] - r:].flip(1)
        elif job.side == "in":
            w = _weight_of(job).float()
            chol = _cholesky_f32(job.stat, job.site)
            gram = w.T @ w
            m_mat = chol.T @ gram @ chol
            del gram
            m_mat += m_mat.T.clone()
            m_mat *= 0.5
            lam, vec = torch.linalg.eigh(m_mat)
            del m_mat
            lam = lam.flip(0).clamp_min(0)
            top = vec[:, vec.shape[1] - r:].flip(1)
            del vec
            s = lam[:r].sqrt()
            live = s > (float(s[0]) * 1e-6 if s.numel() else 0.0)
            inv = torch.where(live, 1.0 / s.clamp_min(1e-30), torch.zeros_like(s))
            basis = w @ (chol @ top * inv)
        else:
            raise LrccError(f"layer {job.site}: unknown statistics side {job.side!r}")
        lam = lam.clamp_min(0)
    finally:
        torch.set_num_threads(threads)
    return FactorResult(job.site, lam.float(), basis.float().contiguous(), time.perf_counter() - t0)


# ---- pools -----------------------------------------------------------------------------------

class InProcessPool:
    """Runs each job here, one after another (one thread per job, like every worker)."""

    workers = 0

    def map(self, jobs: list[FactorJob], on_result: Callable[[int, FactorResult], None] | None = None) -> list[FactorResult]:
        """Run the jobs in order; the list is consumed (each entry set to None once run)."""
        out = []
        for i in range(len(jobs)):
            job, jobs[i] = jobs[i], None  # consumed: its statistics are freed once it has run
            res = run_job(job)
            del job
            if on_result:
                on_result(i, res)
            out.append(res)
        return out

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _dump(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _load(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)


_CHUNK = 4 << 20  # TCPStore's server takes values of up to 8 MiB; larger ones go in pieces


def _put(store, key: str, obj: Any) -> None:
    """Store obj under key, in pieces of at most 4 MiB; the piece count goes in last, so a reader
    that sees `key` finds every piece."""
    data = _dump(obj)
    n = max(1, -(-len(data) // _CHUNK))
    for i in range(n):
        store.set(f"{key}#{i}", data[i * _CHUNK:(i + 1) * _CHUNK])
    store.set(key, str(n))


def _take(store, key: str) -> Any:
    """The object _put stored under key (waiting for it), its keys deleted."""
    n = int(store.get(key))
    data = b"".join(store.get(f"{key}#{i}") for i in range(n))
    for i in range(n):
        store.delete_key(f"{key}#{i}")
    store.delete_key(key)
    return _load(data)


def _parse_init(init_method: str) -> tuple[str, int]:
    if not isinstance(init_method, str) or not init_method.startswith("tcp://"):
        raise LrccError(f"init_method {init_method!r}: expected the driver's address as tcp://HOST:PORT")
    host, _, port = init_method[len("tcp://"):].rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise LrccError(f"init_method {init_method!r}: expected tcp://HOST:PORT with a port number 1..65535")
    return host, int(port)


def _store(init_method: str, driver: bool, timeout_s: float):
    import datetime

    import torch.distributed as dist
    host, port = _parse_init(init_method)
    return dist.TCPStore(host, port, is_master=driver, timeout=datetime.timedelta(seconds=timeout_s),
                         wait_for_workers=False)


def worker_main(init_method: str, rank: int, world_size: int, timeout_s: float = 24 * 3600.0) -> None:
    """A worker: connect to the driver's store at init_method, then take jobs until it says stop.

    Protocol (keys of torch.distributed's TCPStore, served by the driver): round r is announced by
    "r/{r}" = the number of jobs (or "stop"); a worker claims job k = add("r/{r}/next", 1) - 1,
    reads "r/{r}/job/{k}", runs it and writes "r/{r}/res/{k}"."""
    from .blockwise import heap_returns_large_blocks
    heap_returns_large_blocks()
    torch.set_num_threads(1)
    store = _store(init_method, False, timeout_s)
    store.add("joined", 1)
    r = 1
    while True:
        store.wait([f"r/{r}"])
        head = store.get(f"r/{r}")
        if head == b"stop":
            store.add("left", 1)  # the driver keeps the store up until every worker has seen this
            return
        n = int(head)
        while True:
            k = store.add(f"r/{r}/next", 1) - 1
            if k >= n:
                break
            job = _take(store, f"r/{r}/job/{k}")
            try:
                res: Any = run_job(job)
            except Exception as e:  # reported by the driver, naming the layer
                res = LrccError(f"layer {job.site}: factorisation failed on worker {rank}: {type(e).__name__}: {e}")
            del job
            _put(store, f"r/{r}/res/{k}", res)
        r += 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DistributedPool:
    """Jobs on worker processes that share a torch.distributed TCPStore served by this process.

    workers: how many. spawn=True starts them here as fresh processes (`python -m lrcc.cli
    worker`, so the caller's script is not re-imported); spawn=False waits for that
    many to join init_method from elsewhere (`lrcc worker`). Each worker runs one job at a time with
    one thread and claims the next job when it is free; jobs are queued largest first."""

    def __init__(self, workers: int, init_method: str | None = None, spawn: bool = True,
                 timeout_s: float = 24 * 3600.0, join_timeout_s: float = 600.0) -> None:
        import subprocess
        import sys
        if workers < 1:
            raise LrccError(f"workers={workers}: a distributed pool needs at least one worker")
        self.workers = workers
        self.init_method = init_method or f"tcp://127.0.0.1:{free_port()}"
        self.procs: list = []
        self.round = 0
        try:
            self.store = _store(self.init_method, True, timeout_s)
        except LrccError:
            raise
        except Exception as e:
            raise LrccError(f"could not serve the workers' store at {self.init_method}: {e}") from None
        if spawn:
            env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
            for rank in range(1, workers + 1):
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "lrcc.cli", "worker", "--init", self.init_method, "--rank", str(rank),
                     "--world-size", str(workers + 1)], env=env, stdin=subprocess.DEVNULL))
        start = time.monotonic()
        while self.store.add("joined", 0) < workers:
            self._check_alive("before joining")
            if time.monotonic() - start > join_timeout_s:
                self._kill()
                raise LrccError(f"{workers} factorisation worker(s) did not join {self.init_method} within "
                                f"{join_timeout_s:.0f} s" + ("" if spawn else "; start them with `lrcc worker --init "
                                                             f"{self.init_method} --rank R --world-size {workers + 1}`"))
            time.sleep(0.05)

    def _check_alive(self, when: str, site: str | None = None) -> None:
        dead = [(r + 1, p.returncode) for r, p in enumerate(self.procs) if p.poll() is not None]
        if dead:
            self._kill()
            raise LrccError(f"factorisation worker {dead[0][0]} exited with code {dead[0][1]} {when}"
                            + (f" (layer {site} was being factorised)" if site else "") + "; see its error above")

    def map(self, jobs: list[FactorJob], on_result: Callable[[int, FactorResult], None] | None = None) -> list[FactorResult]:
        """Run the jobs, largest first, each taken by the next free worker; results in job order.
        The list is consumed (each job is serialised into the store and dropped here)."""
        self.round += 1
        r = self.round
        order = sorted(range(len(jobs)), key=lambda i: (-jobs[i].cost(), i))
        sites = [j.site for j in jobs]
        for k, i in enumerate(order):
            _put(self.store, f"r/{r}/job/{k}", jobs[i])
            jobs[i] = None
        self.store.set(f"r/{r}", str(len(order)))
        results: list[FactorResult | None] = [None] * len(order)
        waiting = set(range(len(order)))
        while waiting:
            done = [k for k in sorted(waiting) if self.store.check([f"r/{r}/res/{k}"])]
            if not done:
                self._check_alive("while factorising", sites[order[min(waiting)]])
                time.sleep(0.005)
                continue
            for k in done:
                res = _take(self.store, f"r/{r}/res/{k}")
                waiting.discard(k)
                if isinstance(res, Exception):
                    raise res
                results[order[k]] = res
                if on_result:
                    on_result(order[k], res)
        return results  # type: ignore[return-value]

    def close(self) -> None:
        if getattr(self, "store", None) is not None:
            self.store.set(f"r/{self.round + 1}", "stop")
            start = time.monotonic()
            while self.store.add("left", 0) < self.workers and time.monotonic() - start < 30:
                if self.procs and all(p.poll() is not None for p in self.procs):
                    break
                time.sleep(0.01)
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except Exception:
                pass
        self._kill()
        self.store = None

    def _kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_pool(workers: int = 0, init_method: str | None = None) -> "InProcessPool | DistributedPool":
    """workers=0: in this process; N >= 1: N torch.distributed workers (spawned here unless
    init_method names a group whose workers are started elsewhere with `lrcc worker`)."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise LrccError(f"workers={workers!r}: expected a whole number >= 0 (0 runs the factorisations in this process)")
    if workers == 0:
        if init_method:
            raise LrccError("init_method needs workers >= 1 (the number of workers that will join)")
        return InProcessPool()
    return DistributedPool(workers, init_method, spawn=init_method is None)
