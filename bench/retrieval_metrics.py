"""Benchmark: retrieval metrics for 5,000 queries x 20,000 gallery items x 512 dims (issue 6).

Target: <= 20 s and <= 2 GB of extra memory on 2 CPU cores. Each repetition runs in a fresh
process (so the peak RSS is its own): the extra memory is the process's peak RSS minus its RSS
after the features were created. Reports the median over the repetitions of the wall time and of
the process CPU time (on a shared machine the wall time includes waiting for the cores; with 2
threads the CPU time / 2 is the wall time an idle 2-core machine would need).

    python bench/retrieval_metrics.py [--reps 3] [--threads 2] [--similarity cosine]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see peftbench/__init__.py

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import time


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def one_run(args: tuple) -> dict:
    n_q, n_g, dim, threads, kind, map_k, prec_k, seed = args
    import torch

    from peftbench.retrieval import retrieval_metrics

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n_q, dim, generator=gen)  # (Q, D)
    g = torch.randn(n_g, dim, generator=gen)  # (N, D)
    ql = torch.randint(0, 100, (n_q,), generator=gen)
    gl = torch.randint(0, 100, (n_g,), generator=gen)
    base_kb = _rss_kb()
    t0, c0 = time.perf_counter(), time.process_time()
    r = retrieval_metrics(q, ql, g, gl, map_k=map_k, prec_k=prec_k, kind=kind)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "seconds": seconds,
        "cpu_s": cpu,
        "extra_mb": max(0, peak_kb - base_kb) / 1024,
        "map": r.map,
        "prec": r.prec,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=5000)
    ap.add_argument("--gallery", type=int, default=20000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--similarity", default="cosine", choices=("cosine", "euclidean"))
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    out = {}
    for label, map_k, prec_k in (("mAP@200/Prec@200", 200, 200), ("mAP@all/Prec@100", None, 100)):
        runs = []
        for rep in range(args.reps):
            with ctx.Pool(1) as pool:
                runs.append(
                    pool.apply(
                        one_run,
                        (
                            (
                                args.queries,
                                args.gallery,
                                args.dim,
                                args.threads,
                                args.similarity,
                                map_k,
                                prec_k,
                                rep,
                            ),
                        ),
                    )
                )
        out[label] = {
            "median_s": statistics.median(r["seconds"] for r in runs),
            "median_cpu_s": statistics.median(r["cpu_s"] for r in runs),
            "median_extra_mb": statistics.median(r["extra_mb"] for r in runs),
            "runs": runs,
        }
        print(
            f"{label}: median {out[label]['median_s']:.2f} s wall, {out[label]['median_cpu_s']:.2f} s CPU, "
            f"extra memory {out[label]['median_extra_mb']:.0f} MB "
            f"({args.queries} x {args.gallery} x {args.dim}, {args.threads} threads, {args.similarity})"
        )
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
