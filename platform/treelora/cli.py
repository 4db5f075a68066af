"""The ``treelora`` command: run a stream, show a tree, submit a job to a Ray cluster.

Imports of the heavy parts (torch through tree_service, Ray, MLflow) sit inside each command:
``treelora --version`` and ``--help`` must answer at once, and a command pays only for what it uses.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import ConfigError, load_config

REPO_ROOT = Path(__file__).resolve().parents[2]


def format_result(result) -> str:
    from .storage import redact

    names = result.task_names
    R = result.accuracy
    width = max(len(n) for n in names) + 2
    cols = ["joint"] if R.shape[1] == 1 and len(names) > 1 else names
    lines = ["", f"Accuracy matrix R[i][j] (%): task i (rows) after training {'phase' if len(cols) == 1 else 'task'} j (columns)",
             " " * width + "".join(f"{c[:10]:>11}" for c in cols)]
    for i, n in enumerate(names):
        lines.append(f"{n:<{width}}" + "".join(f"{'':>11}" if v != v else f"{v * 100:>11.1f}" for v in R[i]))
    m = result.metrics
    lines.append("")
    lines.append(f"OP  {m['op'] * 100:6.2f}   (average final accuracy)")
    if "bwt" in m:
        lines.append(f"BWT {m['bwt'] * 100:6.2f}   (backward transfer, unclipped; negative = forgetting)")
    lines.append(f"wall time {result.wall_seconds / 60:.1f} min")
    if result.run_id:
        lines.append(f"run id: {result.run_id}  (for `treelora tree show`, `add-task`, `run --resume`)")
    if result.registered_model:
        lines.append(f"registered model: {result.registered_model} (MLflow {redact(result.tracking_uri)})")
        for v in result.versions or []:
            lines.append(f"  version {v[0]}: task {v[1]}  aliases {', '.join(v[2])}")
        lines.append(f"  load the newest with stock peft: treelora.tracking.load_registered_adapter("
                     f"'models:/{result.registered_model}@latest', base_model, '{redact(result.tracking_uri)}')")
    return "\n".join(lines)


def one_line(exc: BaseException) -> str:
    """An error as one redacted line: its type and its message's last line (where Ray and MLflow
    put the cause)."""
    from .storage import redact

    last = (str(exc).strip().splitlines() or [""])[-1]
    return f"{type(exc).__name__}: {redact(last)[:500]}"


def cmd_run(args) -> int:
    from .console import Console
    from .train.stream import run_stream

    cfg = load_config(args.config, args.set)
    console = Console()
    result = run_stream(cfg, executor="local" if args.local else "ray", address=args.address, resume=args.resume,
                        log=console.line, progress=console.event)
    summary = format_result(result)
    if result.tracking_uri:
        from .storage import redact

        summary += f"\n\nMLflow UI: mlflow ui --backend-store-uri {redact(result.tracking_uri)}  (then open http://127.0.0.1:5000)"
    console.summary(summary)
    return 0


def cmd_validate(args) -> int:
    """The config and every record of every task, checked as a run would, and what a run would use."""
    import time

    from .train.setup import (
        build_model,
        split_sizes,
        steps_per_epoch,
        stream_kind,
        run_id_of,
    )
    from .train.validate import preflight

    t0 = time.perf_counter()
    cfg = load_config(args.config, args.set)
    stream = preflight(cfg)
    kind = stream_kind(stream)
    model = build_model(cfg, kind)  # the tokenizer and the lengths a run would use
    cut = model.prepare(stream.tasks)
    print(f"stream {stream.name}: {len(stream.tasks)} {kind} tasks, run id {run_id_of(cfg, stream)}")
    for task in stream.tasks:
        n_cut, n = cut[task.name]
        labels = f"{len(task.labels)} labels ({', '.join(task.labels[:6])}{', ...' if len(task.labels) > 6 else ''})" if task.labels \
            else f"metric {task.metric}"
        print(f"  {task.name}: {len(task.train)} train / {len(task.eval)} eval / {len(task.test)} test rows; {labels}; "
              f"{100 * n_cut / max(n, 1):.0f}% of training rows cut to fit")
    budget = f", decoding up to {cfg.model.max_new_tokens or 'the longest training answer'} new tokens" if model.is_causal else ""
    steps = steps_per_epoch(stream.tasks[:1], cfg.train.batch_size, cfg.scaling.num_workers) * cfg.train.epochs
    print(f"model {model.source}: max_length {model.max_length}{budget}")
    limits = ", ".join(f"{split} {n}" for split, n in split_sizes(cfg).items()) or "none (every row)"
    print(f"sizes: rows per split at most: {limits}; batch {cfg.train.batch_size} on {cfg.scaling.num_workers} worker(s), "
          f"{cfg.train.epochs} epoch(s) ({steps} steps for the first task), method {cfg.method.name}")
    print(f"valid ({time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_tree_show(args) -> int:
    from tree_service import TreeRegistry

    from .layout import RunLayout
    from .storage import redact

    cfg = load_config(args.config, args.set)
    registry = TreeRegistry(args.storage or RunLayout.of(cfg).tree_uri)
    streams = registry.list_streams()
    if args.stream not in streams:
        print(f"no tree stream {args.stream!r} in {redact(registry.store.uri)}; known: {streams}", file=sys.stderr)
        return 2
    info = registry.describe(args.stream)
    print(f"stream {args.stream}: version {info.version}, {info.num_tasks} tasks, depth {info.depth}, "
          f"signatures [L={info.space['num_modules']}, D={info.space['width']}] ({info.space['projection']})")
    print(info.tree_text)
    if args.png:
        from .tracking.plots import tree_png

        path = tree_png(info.tree, args.png, title=f"{args.stream} v{info.version}")
        print(f"wrote {path}")
    return 0


def cmd_route(args) -> int:
    from .train.routed import describe_routes

    for line in describe_routes(load_config(args.config, args.set), args.stream, args.text):
        print(line)
    return 0


def cmd_add_task(args) -> int:
    """Validate a task spec and drop it into a stream's inbox (the running stream trains it next)."""
    from .data.streams import load_task_spec
    from .layout import RunLayout
    from .train.inbox import Inbox
    from .train.setup import split_sizes

    cfg = load_config(args.config, args.set)
    try:
        task, spec = load_task_spec(args.task_spec, sizes=split_sizes(cfg), seed=cfg.stream.seed)
    except (ValueError, FileNotFoundError) as exc:
        print(f"treelora: task spec refused: {exc}", file=sys.stderr)
        return 2
    layout = RunLayout.of(cfg, args.stream)
    layout.mirror.pull_file(layout.rel(layout.progress_file))  # a remote workdir: is the stream there?
    if not layout.stream_dir.is_dir():
        print(f"treelora: no stream {args.stream!r} under {layout.local_root / 'streams'} (the stream id is printed by `treelora run`)",
              file=sys.stderr)
        return 2
    dropped = Inbox.of(layout).drop(spec)
    layout.mirror.push_file(layout.rel(dropped))
    print(f"task {task.name!r} ({task.kind}, {len(task.train)} train / {len(task.test)} test rows) is in the inbox: {dropped}\n"
          f"a running stream trains it after its current tasks; otherwise the next `treelora run` of this stream does")
    return 0


def cmd_submit(args) -> int:
    from . import ray_jobs

    cfg = load_config(args.config, args.set)  # refuse a broken config here, not on the cluster
    job_id, entrypoint = ray_jobs.submit(cfg, args.config, args.set, args.address, args.submission_id)
    from .storage import redact

    print(f"submitted job {job_id}: {redact(entrypoint)}", flush=True)
    if args.no_wait:
        print(job_id)  # alone on its line, for scripts
        return 0
    final = ray_jobs.follow(job_id, args.address, sys.stdout)
    print(f"job {job_id}: {final}")
    return 0 if final == "SUCCEEDED" else 1


def cmd_tune(args) -> int:
    from .tune import SweepSpec, run_sweep

    cfg = load_config(args.config, args.set)
    spec = SweepSpec.load(args.space, cfg)
    result = run_sweep(cfg, spec, args.name, address=args.address)
    print(f"\nsweep {args.name}: {len(result.trials)} trials, {result.stopped_early} stopped early")
    sign = -1 if spec.mode == "max" else 1
    for t in sorted(result.trials, key=lambda t: (not t["complete"], sign * (t["op"] or 0))):  # whole-stream trials first
        op = "n/a" if t["op"] is None else f"{t['op'] * 100:.2f}"
        state = "stopped early" if t["stopped_early"] else ("error: " + t["error"][:80] if t["error"] else "complete")
        print(f"  {spec.metric} {op:>6}  after {t['tasks_done']} task(s)  {state}  {json.dumps(t['params'])}")
    print(f"best: {spec.metric} {result.best_metric * 100:.2f} with {json.dumps(result.best_params)}")
    print(f"best config: {result.best_yaml}  (run it: treelora run {result.best_yaml})")
    print(f"trials_stopped_early={result.stopped_early}")
    return 0


def cmd_job(args) -> int:
    from . import ray_jobs

    if args.command == "status":
        print(ray_jobs.status(args.job_id, args.address))
    elif args.command == "logs":
        if args.follow:
            final = ray_jobs.follow(args.job_id, args.address, sys.stdout)
            return 0 if final == "SUCCEEDED" else 1
        print(ray_jobs.logs(args.job_id, args.address), end="")
    else:
        print(f"{args.job_id}: {'stop requested' if ray_jobs.stop(args.job_id, args.address) else 'already ended'}")
    return 0


SET_HELP = dict(action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override a config field")
ADDRESS_HELP = "Ray dashboard address (default: $RAY_ADDRESS, else http://127.0.0.1:8265)"


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    ap = argparse.ArgumentParser(prog="treelora", description="Continual training of layer-wise LoRA adapters (TreeLoRA) on Ray")
    ap.add_argument("--version", action="version", version=f"treelora {__version__} (Python {sys.version.split()[0]})")
    ap.add_argument("--verbose", "-v", action="store_true", help="show Ray's, DeepSpeed's, transformers' and MLflow's own output "
                    "and full tracebacks")
    sub = ap.add_subparsers(dest="command", required=True)
    # -v after the subcommand too; SUPPRESS keeps a -v given before it
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS, help="as treelora --verbose")

    def command(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[verbose], **kwargs)

    _run_commands(command)
    _tree_commands(command("tree", help="the gradient-similarity tree"), verbose)
    _job_commands(command)
    return ap


def _run_commands(command) -> None:
    run = command("run", help="run (or resume) a stream; with no config: olora-cls, local Ray, CPU, 2 workers, ZeRO-2, MLflow on SQLite",
                  description="Run (or resume) a stream. Everything goes under the config's workdir (default "
                              "./treelora_runs): streams/<run id>/ (progress, each task's adapter), trees/, ray_train/ "
                              "(checkpoints), mlflow.db and mlartifacts/ (unless tracking.tracking_uri is set).")
    run.add_argument("config", nargs="?", help="run config YAML (see jobs/configs/)")
    run.add_argument("--set", **SET_HELP)
    run.add_argument("--address", help="Ray address of an existing cluster (default: start or join a local one)")
    run.add_argument("--resume", metavar="RUN_ID", help="continue this run (its id is printed by `treelora run`); "
                     "refused, naming the fields, when the config's settings make another run")
    run.add_argument("--local", action="store_true", help="one process, no Ray or DeepSpeed (the reference runner; uses the GPU if there is one)")
    run.set_defaults(fn=cmd_run)
    check = command("validate", help="check a config and every record of every task, and show what a run would use; "
                    "trains nothing", description="Exit 0 when a run of this config would start; else one line naming "
                    "the first problem and exit 2.")
    check.add_argument("config", nargs="?", help="run config YAML (default: the built-in olora-cls run)")
    check.add_argument("--set", **SET_HELP)
    check.set_defaults(fn=cmd_validate)
    add = command("add-task", help="add a task to a stream (running or not): it is validated and trained after the stream's tasks")
    add.add_argument("stream", help="the stream id (the run id printed by `treelora run`: <stream>.<method>.<model>.<hash>)")
    add.add_argument("task_spec", help="YAML task spec: one stream-manifest entry (name, path or splits, kind, metric, ...)")
    add.add_argument("--config", help="the stream's run config (for its workdir and subsample sizes)")
    add.add_argument("--set", **SET_HELP)
    add.set_defaults(fn=cmd_add_task)
    route = command("route", help="answer inputs without a task id: the leaf the router picks, its path down the tree, the answer")
    route.add_argument("stream", help="the stream id (the run id printed by `treelora run`)")
    route.add_argument("text", nargs="+", help="one or more inputs")
    route.add_argument("--config", help="the stream's run config (for its workdir, stream and model)")
    route.add_argument("--set", **SET_HELP)
    route.set_defaults(fn=cmd_route)
    tune = command("tune", help="sweep config fields with Ray Tune (tasks are iterations; ASHA stops poor trials early)")
    tune.add_argument("config", nargs="?", help="the run config every trial starts from")
    tune.add_argument("--space", required=True, help="sweep YAML: space (field -> {choice|grid|uniform|loguniform|randint: [...]}), "
                      "metric, mode, num_samples, max_concurrent, scheduler, grace_tasks, reduction_factor")
    tune.add_argument("--name", default="sweep", help="the sweep's name; running the same name again resumes it")
    tune.add_argument("--set", **SET_HELP)
    tune.add_argument("--address", help="Ray address of an existing cluster (default: start or join a local one)")
    tune.set_defaults(fn=cmd_tune)


def _tree_commands(tree: argparse.ArgumentParser, verbose: argparse.ArgumentParser) -> None:
    tree_sub = tree.add_subparsers(dest="tree_command", required=True)
    show = tree_sub.add_parser("show", parents=[verbose], help="print a stream's tree (and draw it as PNG)")
    show.add_argument("stream", help="tree stream id (the run id printed by `treelora run`: <stream>.<method>.<model>.<hash>)")
    show.add_argument("--config", help="run config whose tree.storage_uri / workdir to read")
    show.add_argument("--storage", help="tree storage URI (overrides the config)")
    show.add_argument("--png", help="write the tree as a PNG here")
    show.add_argument("--set", **SET_HELP)
    show.set_defaults(fn=cmd_tree_show)


def _job_commands(command) -> None:
    submit = command("submit", help="run a stream as a Ray Job on a cluster and follow its logs")
    submit.add_argument("config", nargs="?", help="run config YAML (workdir must be storage every node reaches, e.g. s3://)")
    submit.add_argument("--address", help=ADDRESS_HELP)
    submit.add_argument("--set", **SET_HELP)
    submit.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    submit.add_argument("--submission-id", help="the job id to use (default: Ray chooses one)")
    submit.set_defaults(fn=cmd_submit)
    for name, text in (("status", "a job's status"), ("logs", "a job's logs"), ("stop", "stop a job")):
        job = command(name, help=text)
        job.add_argument("job_id", help="the id `treelora submit` printed")
        job.add_argument("--address", help=ADDRESS_HELP)
        if name == "logs":
            job.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
        job.set_defaults(fn=cmd_job)


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    from .console import quiet_libraries

    quiet_libraries(args.verbose)
    from tree_service import TreeServiceError

    from .storage import redact

    try:
        return args.fn(args)
    except ConfigError as exc:
        print(f"treelora: config error: {redact(str(exc))}", file=sys.stderr)
        return 2
    except TreeServiceError as exc:  # e.g. a damaged snapshot: named, not a traceback
        print(f"treelora: tree service: {redact(str(exc).splitlines()[0])}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("treelora: interrupted; the same command resumes the run", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line for people; the traceback with --verbose
        if args.verbose:
            raise
        print(f"treelora: {one_line(exc)} (rerun with --verbose for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
