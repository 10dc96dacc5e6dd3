"""Factorisation jobs, and the pools that run them: in process, or on torch.distributed workers.

Factorising one linear layer needs only its weight and its calibration statistics, so the layers
of a block are independent jobs. A job is a plain function of its inputs, run with one thread, so
its result is the same bit for bit whichever process runs it: the in-process pool and any number
of workers give identical compressed models.

The distributed pool is torch.distributed's RPC (TensorPipe over TCP): rank 0 is the driver that
streams the model and hands out jobs, ranks 1..N are workers. Local workers are started as fresh
processes; workers on other machines join with `lrcc worker --init tcp://HOST:PORT --rank R
--world-size N` (see docs/streaming.md). Jobs are handed out as workers become free (the largest
first), results come back by job index, so the order of completion never shows in the result.
"""
from __future__ import annotations

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


WORKER_NAME = "lrcc-worker-{}"


def _backend_options(init_method: str, timeout_s: float):
    import torch.distributed.rpc as rpc
    return rpc.TensorPipeRpcBackendOptions(init_method=init_method, rpc_timeout=timeout_s, num_worker_threads=4)


def worker_main(init_method: str, rank: int, world_size: int, timeout_s: float = 24 * 3600.0) -> None:
    """A worker: join the group at init_method as `rank` of `world_size` (the driver is rank 0), run
    the jobs the driver sends until it shuts the group down."""
    import torch.distributed.rpc as rpc
    torch.set_num_threads(1)
    rpc.init_rpc(WORKER_NAME.format(rank), rank=rank, world_size=world_size,
                 rpc_backend_options=_backend_options(init_method, timeout_s))
    _shutdown()


def _shutdown() -> None:
    import warnings

    import torch.distributed.rpc as rpc
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own deprecation notice from inside shutdown
        rpc.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DistributedPool:
    """Jobs on torch.distributed RPC workers; this process is the driver (rank 0).

    workers: how many. spawn=True starts them here as fresh processes (`python -m
    lrcc.planner.workers`, so the caller's script is not re-imported); spawn=False waits for that
    many to join init_method from elsewhere (`lrcc worker`). Each worker runs one job at a time with
    one thread; the next job goes to the first worker to finish (largest jobs first)."""

    def __init__(self, workers: int, init_method: str | None = None, spawn: bool = True,
                 timeout_s: float = 24 * 3600.0, join_timeout_s: float = 600.0) -> None:
        import subprocess
        import sys
        import threading

        import torch.distributed.rpc as rpc
        if workers < 1:
            raise LrccError(f"workers={workers}: a distributed pool needs at least one worker")
        if not rpc.is_available():
            raise LrccError("this torch build has no torch.distributed.rpc; use workers=0")
        self.workers = workers
        self.init_method = init_method or f"tcp://127.0.0.1:{free_port()}"
        self.procs: list = []
        self._open = False
        if spawn:
            env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
            for rank in range(1, workers + 1):
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "lrcc.planner.workers", "--init", self.init_method, "--rank", str(rank),
                     "--world-size", str(workers + 1)], env=env, stdin=subprocess.DEVNULL))
        failure: list[BaseException] = []

        def join() -> None:
            import warnings
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # torch's own deprecation notice from inside init_rpc
                    rpc.init_rpc("lrcc-driver", rank=0, world_size=workers + 1,
                                 rpc_backend_options=_backend_options(self.init_method, timeout_s))
            except BaseException as e:  # reported by the main thread
                failure.append(e)

        t = threading.Thread(target=join, daemon=True)
        t.start()
        start = time.monotonic()
        while t.is_alive():
            t.join(0.1)
            dead = [(r + 1, p.returncode) for r, p in enumerate(self.procs) if p.poll() is not None]
            if dead:
                self._kill()
                raise LrccError(f"factorisation worker {dead[0][0]} exited with code {dead[0][1]} before joining "
                                f"{self.init_method}; see its error above")
            if time.monotonic() - start > join_timeout_s:
                self._kill()
                raise LrccError(f"{workers} factorisation worker(s) did not join {self.init_method} within "
                                f"{join_timeout_s:.0f} s" + ("" if spawn else "; start them with `lrcc worker --init "
                                                             f"{self.init_method} --rank R --world-size {workers + 1}`"))
        if failure:
            self._kill()
            raise LrccError(f"could not start the factorisation workers at {self.init_method}: {failure[0]}")
        self._open = True

    def map(self, jobs: list[FactorJob], on_result: Callable[[int, FactorResult], None] | None = None) -> list[FactorResult]:
        """Run the jobs, largest first, each on the next free worker; results in job order. The list
        is consumed (each entry set to None once its result is back)."""
        import torch.distributed.rpc as rpc
        order = sorted(range(len(jobs)), key=lambda i: (-jobs[i].cost(), i))
        results: list[FactorResult | None] = [None] * len(jobs)
        pending = iter(order)
        running: dict[int, tuple[int, Any]] = {}  # worker rank -> (job index, future)

        def submit(rank: int) -> None:
            i = next(pending, None)
            if i is not None:
                running[rank] = (i, rpc.rpc_async(WORKER_NAME.format(rank), run_job, args=(jobs[i],)))

        for rank in range(1, self.workers + 1):
            submit(rank)
        while running:
            finished = [rank for rank, (_, fut) in running.items() if fut.done()]
            if not finished:
                time.sleep(0.002)
                dead = [(r + 1, p.returncode) for r, p in enumerate(self.procs) if p.poll() is not None]
                if dead:
                    raise LrccError(f"factorisation worker {dead[0][0]} exited with code {dead[0][1]} while "
                                    f"factorising {jobs[running[dead[0][0]][0]].site if dead[0][0] in running else 'a layer'}")
                continue
            for rank in finished:
                i, fut = running.pop(rank)
                jobs[i] = None  # consumed: its statistics are freed once it has run
                try:
                    res = fut.wait()
                except Exception as e:
                    raise LrccError(f"layer {jobs[i].site}: factorisation failed on worker {rank}: {e}") from None
                results[i] = res
                if on_result:
                    on_result(i, res)
                submit(rank)
        return results  # type: ignore[return-value]

    def close(self) -> None:
        if self._open:
            self._open = False
            _shutdown()
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except Exception:
                pass
        self._kill()

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


def main(argv: list[str] | None = None) -> None:
    import argparse
    ap = argparse.ArgumentParser(prog="lrcc worker", description="a factorisation worker for compile_blockwise")
    ap.add_argument("--init", required=True, help="the driver's tcp://HOST:PORT")
    ap.add_argument("--rank", type=int, required=True, help="this worker's rank, 1..world-size-1")
    ap.add_argument("--world-size", type=int, required=True, help="workers + 1 (the driver)")
    a = ap.parse_args(argv)
    if not 1 <= a.rank < a.world_size:
        ap.error(f"--rank {a.rank}: must be between 1 and --world-size - 1 = {a.world_size - 1}")
    worker_main(a.init, a.rank, a.world_size)


if __name__ == "__main__":
    main()
