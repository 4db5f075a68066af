"""Speed of choosing a previous task per module: exhaustive vs the authors' sampler vs the tree.

    .venv/bin/python benchmarks/bench_tree.py            # full: N up to 10,000 (about 5 min)
    .venv/bin/python benchmarks/bench_tree.py --quick    # N up to 1,000 (under a minute)

Per step, each selector picks one previous task for every module and observes the gap between
the running signature and that task's signature (L = 64 modules, D = 1,024). All selectors run
in this one process on the same signatures, so their ratio is measured side by side. Also:
snapshot write/read time and bytes per task, the Ray actor round trip for snapshot() and
add_task(), how often the Cauchy sketch picks the same task as exact L1, and how often the tree
bandit finds the nearest task on clustered vs unstructured task sets.
The last line is ``selection_speedup_n1000=<exhaustive time / tree time at N=1000>``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from tree_service import ExhaustiveSelector, Projector, ReferenceSampler, SignatureSpace, SnapshotStore, TaskTree, TreeLCBBandit
from tree_service.snapshot import StreamSnapshot, TaskRecord, content_hash


def clustered(n: int, L: int, D: int, seed: int = 0, cluster_size: int = 8, structured: bool = True):
    g = torch.Generator().manual_seed(seed)
    if structured:
        centers = 3.0 * torch.randn(n // cluster_size + 1, L, D, generator=g)
        sig = centers[torch.arange(n) // cluster_size]
        sig += torch.randn(n, L, D, generator=g)
    else:
        sig = torch.randn(n, L, D, generator=g)
    nearest = torch.randint(n, (L,), generator=g)
    running = sig[nearest, torch.arange(L)] + 0.05 * torch.randn(L, D, generator=g)
    return sig, running, nearest.numpy()


def per_step(fn, steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def selection_table(ns: list[int], L: int, D: int) -> dict[int, dict[str, float]]:
    space = SignatureSpace(L, D)
    rows = {}
    print(f"\n## Per-step selection cost (L={L}, D={D}; median over steps; ms)")
    print("| N | exhaustive | reference | tree | exhaustive/tree | reference/tree | tree build (s) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in ns:
        sig, running, _ = clustered(n, L, D)
        t0 = time.perf_counter()
        tree = TaskTree.build(space, [f"t{i}" for i in range(n)], sig)
        build_s = time.perf_counter() - t0
        compiled = tree.compiled()
        exhaustive = ExhaustiveSelector(space)
        reference = ReferenceSampler(space, compiled, num_tasks=n, steps_per_epoch=1000)
        bandit = TreeLCBBandit(space, compiled)
        ex_steps = 3 if n >= 10_000 else 10 if n >= 1000 else 50
        t_ex = per_step(lambda: exhaustive.step(running, sig), ex_steps, warmup=1)
        t_ref = per_step(lambda: reference.step(running, sig), 30 if n >= 10_000 else 100)
        t_tree = per_step(lambda: bandit.step(running, sig), 200)
        rows[n] = {"exhaustive": t_ex, "reference": t_ref, "tree": t_tree}
        print(f"| {n:,} | {t_ex*1e3:.3f} | {t_ref*1e3:.3f} | {t_tree*1e3:.3f} | {t_ex/t_tree:.1f} | {t_ref/t_tree:.1f} | {build_s:.2f} |", flush=True)
        del sig
    return rows


def snapshot_table(n: int, L: int, D: int) -> None:
    space = SignatureSpace(L, D)
    sig, _, _ = clustered(n, L, D)
    snap = StreamSnapshot.empty("bench", space)
    records = tuple(TaskRecord(f"t{i}", 0, "bench", i + 1, content_hash(f"t{i}", sig[i])) for i in range(n))
    snap = StreamSnapshot("bench", n, space, 1, 1, records, sig)
    with tempfile.TemporaryDirectory() as root:
        store = SnapshotStore(root)
        t0 = time.perf_counter()
        path = store.write(snap)
        write_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        store.read("bench")
        read_s = time.perf_counter() - t0
        size = store.fs.get_file_info(path).size
    print(f"\n## Snapshot (Arrow IPC, local disk), N={n:,}, L={L}, D={D}")
    print("| write (s) | read+validate (s) | bytes per task | signature bytes per task |")
    print("|---:|---:|---:|---:|")
    print(f"| {write_s:.3f} | {read_s:.3f} | {size / n:,.0f} | {L * D * 4:,} |")


def actor_table(n: int, L: int, D: int) -> None:
    import ray

    from tree_service.actor import get_tree_service

    ray.init(num_cpus=2, object_store_memory=512 * 1024**2, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as root:
            service = get_tree_service(root, name="bench-tree")
            sig, _, _ = clustered(n + 20, L, D)
            sig_np = sig.numpy()
            adds = []
            for i in range(n + 20):
                t0 = time.perf_counter()
                service.add_task("bench", f"t{i}", sig_np[i], i)
                adds.append(time.perf_counter() - t0)
            snaps = []
            for _ in range(10):
                t0 = time.perf_counter()
                service.snapshot("bench")
                snaps.append(time.perf_counter() - t0)
    finally:
        ray.shutdown()
    print(f"\n## Ray actor round trip (local Ray, stream of {n + 20} tasks, L={L}, D={D}; median ms)")
    print("| add_task (last 20, persisted) | snapshot (signatures through the object store) |")
    print("|---:|---:|")
    print(f"| {statistics.median(adds[-20:])*1e3:.1f} | {statistics.median(snaps)*1e3:.1f} |")


def sketch_table(quick: bool) -> None:
    print("\n## Cauchy sketch: selection agreement with exact L1 (raw module size 8,192; 40 tasks)")
    print("| width D | noise 0.5 | noise 1.0 | noise 2.0 |")
    print("|---:|---:|---:|---:|")
    trials = 40 if quick else 100
    for width in ([128, 512] if quick else [64, 128, 256, 512, 1024]):
        space = SignatureSpace(1, width, projection="cauchy", seed=1)
        proj = Projector(space)
        g = torch.Generator().manual_seed(0)
        tasks = torch.randn(40, 8192, generator=g)
        sketched = tasks @ proj.matrix(8192)
        cells = []
        for noise in (0.5, 1.0, 2.0):
            agree = 0
            for _ in range(trials):
                q = tasks[int(torch.randint(40, (1,), generator=g))] + noise * torch.randn(8192, generator=g)
                agree += int((tasks - q).abs().sum(1).argmin()) == int(space.distance(sketched, proj.project_module(q)).argmin())
            cells.append(f"{agree / trials:.2f}")
        print(f"| {width} | " + " | ".join(cells) + " |")


def quality_table(quick: bool) -> None:
    print("\n## Tree bandit: share of the last 100 of T steps that pick each module's nearest task (N=64, L=16, D=64)")
    print("| task set | T | nearest-task hit rate (median over modules) | regret / uniform regret |")
    print("|---|---:|---:|---:|")
    for structured in (True, False):
        for T in ([400] if quick else [400, 1600]):
            n, L, D = 64, 16, 64
            sig, running, nearest = clustered(n, L, D, seed=2, structured=structured)
            space = SignatureSpace(L, D)
            bandit = TreeLCBBandit(space, TaskTree.build(space, [f"t{i}" for i in range(n)], sig).compiled())
            gaps_all = space.distance(running.unsqueeze(0), sig).double().numpy()
            best, regret, late = gaps_all.min(0), 0.0, []
            for step in range(T):
                tasks, gaps = bandit.step(running, sig)
                regret += float((gaps - best).sum())
                if step >= T - 100:
                    late.append(tasks)
            hit = np.median((np.array(late) == nearest[None]).mean(0))
            uniform = T * float((gaps_all.mean(0) - best).sum())
            print(f"| {'clustered' if structured else 'unstructured'} | {T} | {hit:.2f} | {regret / uniform:.3f} |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N up to 1,000 and smaller side tables (under a minute)")
    ap.add_argument("--no-ray", action="store_true", help="skip the actor round trip")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    L, D = 64, 1024
    print(f"# bench_tree ({'quick' if args.quick else 'full'}), torch {torch.__version__}, {torch.get_num_threads()} threads")
    ns = [10, 100, 1000] if args.quick else [10, 100, 1000, 10_000]
    rows = selection_table(ns, L, D)
    snapshot_table(100 if args.quick else 1000, L, D)
    if not args.no_ray:
        actor_table(20 if args.quick else 200, L, D)
    sketch_table(args.quick)
    quality_table(args.quick)
    if 10_000 in rows:
        print(f"\ntree_ms_per_step_n10000={rows[10_000]['tree'] * 1e3:.3f}")
    print(f"selection_speedup_n1000={rows[1000]['exhaustive'] / rows[1000]['tree']:.1f}")


if __name__ == "__main__":
    sys.exit(main())
