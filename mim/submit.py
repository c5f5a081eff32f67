"""`mimkit submit pretrain|tokenizer|probe ...`: run a mimkit command as a submitit job, on SLURM or here.

The job is one task per GPU (SLURM starts them; `dist.init` turns the scheduler's variables into torch's) and
a submitit `Checkpointable`: on preemption, or `--signal-delay` seconds before the time limit, SLURM sends
USR2, submitit calls `Job.checkpoint` on rank 0 and requeues what it returns: the same command with
resume=auto, which continues from the run's `checkpoints/last.pt` (written every `ckpt.every` epochs).
`--executor local` runs the same code path on this machine (submitit's LocalExecutor requeues in place).

The run directory gets `submitit/` (each task's stdout/stderr and submitit's pickles), `jobs.json` (job id,
executor, command and log paths of every submission) and the resolved `config.yaml` (pretrain: written at
submission; the other commands write theirs when the job starts)."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import time
from pathlib import Path
from typing import Callable

import submitit

from .config import ConfigError

TARGETS = ("pretrain", "tokenizer", "probe")


def is_override(arg: str) -> bool:
    return "=" in arg and not arg.startswith("-")


def with_overrides(overrides: list[str], values: dict[str, str]) -> list[str]:
    """`key=value` overrides with those of `values` replacing the user's."""
    return [a for a in overrides if a.partition("=")[0] not in values] + [f"{k}={v}" for k, v in values.items()]


class Job(submitit.helpers.Checkpointable):
    """`mimkit <head...> <overrides...> --config <file>...` run as a requeueable submitit job.

    `head` is the command with its sub-command and flags (e.g. probe linear --checkpoint X); keeping the
    overrides apart lets a requeue replace them and keeps them together for argparse. `entry` is `mimkit`'s
    main(argv) (pickled by name: the job imports it where it runs)."""

    def __init__(self, head: list[str], overrides: list[str], configs: list[str], output_dir: str,
                 entry: Callable[[list[str]], int]):
        self.head, self.overrides, self.configs, self.output_dir = list(head), list(overrides), list(configs), output_dir
        self.entry = entry

    @property
    def argv(self) -> list[str]:
        return [*self.head, *self.overrides, *(a for f in self.configs for a in ("--config", f))]

    def __call__(self) -> dict | None:
        from .dist import export_submitit_env
        export_submitit_env()  # RANK/WORLD_SIZE/MASTER_ADDR/... from SLURM_* before the command starts
        code = self.entry(self.argv)
        if code:
            raise RuntimeError(f"`mimkit {shlex.join(self.argv)}` exited with status {code}; "
                               f"see {self.output_dir}/submitit/ and {self.output_dir}/log.txt")
        metrics = Path(self.output_dir) / "metrics.json"
        return json.loads(metrics.read_text()) if os.environ.get("RANK", "0") == "0" and metrics.exists() else None

    def requeue_overrides(self) -> dict[str, str]:
        """pretrain and tokenizer training continue from the run's last.pt (none yet: start as the first
        attempt did); a probe keeps no checkpoint, so it starts over in its own directory; a study step decides
        for itself."""
        if self.head[0] == "probe":
            return {"overwrite": "true"}
        if self.head[0] == "study":  # a study step resumes or reruns itself
            return {}
        last = Path(self.output_dir) / "checkpoints" / "last.pt"
        return {"overwrite": "false", **({"resume": "auto"} if last.exists() else {})}

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on rank 0 when the job is preempted or about to time out; the returned
        submission is what the requeued job runs."""
        overrides = with_overrides(self.overrides, self.requeue_overrides())
        return submitit.helpers.DelayedSubmission(type(self)(self.head, overrides, self.configs, self.output_dir,
                                                             self.entry))


def run_dir(args: argparse.Namespace) -> tuple[Path, dict[str, str], Callable[[], object]]:
    """The command's run directory (resolved as the command itself would), the overrides every attempt of
    the job runs with, and what to prepare in the run directory at submission.

    pretrain: the run directory is prepared at submission (a conflicting old run is refused now, not in the
    job's log; overwrite=true clears it now; the resolved config.yaml is written): every attempt is resume=auto."""
    if args.command == "pretrain":
        from .engine import check_run_dir, resolve_output_dir, write_run_dir
        from .methods import pretrain_config, validate
        cfg = pretrain_config(args.config, args.overrides)
        validate(cfg)
        cfg.output_dir = str(resolve_output_dir(cfg).resolve())
        keep = {} if cfg.resume not in ("auto", "none") else {"resume": "auto"}  # resume=<file>: kept
        return (Path(cfg.output_dir), {"output_dir": cfg.output_dir, "overwrite": "false", **keep},
                lambda: (check_run_dir(cfg), write_run_dir(cfg)))
    if args.command == "tokenizer":
        if args.tokenizer_command != "train":
            raise ConfigError("mimkit submit tokenizer: only `tokenizer train` runs as a job")
        from mimkit.tokenizers.config import tokenizer_config
        from mimkit.tokenizers.train import resolve_output_dir as tokenizer_dir
        out = tokenizer_dir(tokenizer_config(args.config, args.overrides))
    else:
        from mimkit.probes.config import default_output_dir
        from mimkit.probes.run import build_probe_config
        cfg, _ = build_probe_config(args.protocol, args.checkpoint, args.config, args.overrides)
        out = Path(cfg.output_dir or default_output_dir(cfg))
    return out.resolve(), {"output_dir": str(out.resolve())}, lambda: None


def add_executor_args(p: argparse.ArgumentParser, defaults: bool = True) -> None:
    """Options of `mimkit submit` (`defaults=False`: none, to pick up the options given after COMMAND)."""
    d = (lambda v: v) if defaults else (lambda v: argparse.SUPPRESS)
    p.add_argument("--executor", choices=("slurm", "local"), default=d("slurm"),
                   help="slurm: sbatch through submitit; local: the same job on this machine (default: slurm)")
    p.add_argument("--nodes", type=int, default=d(1), help="number of nodes (default: 1)")
    p.add_argument("--gpus-per-node", type=int, default=d(1),
                   help="GPUs per node; one task (process) per GPU (default: 1)")
    p.add_argument("--tasks-per-node", type=int, default=d(0),
                   help="processes per node (default: --gpus-per-node, or 1 without GPUs; >1 on CPU: gloo DDP)")
    p.add_argument("--cpus-per-task", type=int, default=d(10), help="CPU cores per task (default: 10)")
    p.add_argument("--mem", type=float, default=d(None), metavar="GB", help="memory per node in GB")
    p.add_argument("--timeout", type=int, default=d(4320), metavar="MIN",
                   help="time limit in minutes; the job requeues itself before it (default: 4320)")
    p.add_argument("--partition", default=d(None), help="SLURM partition")
    p.add_argument("--account", default=d(None), help="SLURM account")
    p.add_argument("--qos", default=d(None), help="SLURM quality of service")
    p.add_argument("--constraint", default=d(None), help="SLURM node constraint (e.g. volta32gb)")
    p.add_argument("--max-timeouts", type=int, default=d(20),
                   help="requeues allowed after reaching the time limit (preemptions do not count; default: 20)")
    p.add_argument("--signal-delay", type=int, default=d(120), metavar="S",
                   help="seconds before the time limit at which the job requeues itself (default: 120)")
    p.add_argument("--name", default=d(None), help="job name (default: mimkit_<command>)")
    p.add_argument("--wait", action="store_true", default=d(False),
                   help="wait until the job (with its requeues) has finished and report how it ended")


EPILOG = """Options may come before or after COMMAND; everything else goes to `mimkit COMMAND`.
examples:
  # ViT-B MAE on ImageNet, 8 nodes x 8 GPUs (batch 64 per GPU = 4096)
  mimkit submit pretrain --nodes 8 --gpus-per-node 8 --partition gpu --timeout 4320 \\
      --config configs/pretrain/mae_vit_base_imagenet.yaml data.root=/data/imagenet output_dir=runs/mae_vitb
  # the same code path on this machine, 2 CPU processes
  mimkit submit pretrain --executor local --gpus-per-node 0 --tasks-per-node 2 data.name=digits --wait
  mimkit submit tokenizer train --config configs/tokenizer/kmeans_digits.yaml
  mimkit submit probe linear --checkpoint runs/mae_vitb/checkpoints/last.pt --nodes 1 --gpus-per-node 8"""


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "submit", help="run a command as a SLURM (or local) job with submitit, requeued on preemption",
        description="Run `mimkit COMMAND ...` as a submitit job: one task per GPU, requeued with resume=auto "
                    "on preemption or timeout.", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_executor_args(p)
    p.add_argument("target", choices=TARGETS, metavar="COMMAND", help="pretrain | tokenizer | probe")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the command's arguments (--config FILE, key=value ...)")
    p.set_defaults(func=cmd_submit)


def split_args(args: argparse.Namespace) -> tuple[argparse.Namespace, list[str]]:
    """The executor options (also those given after COMMAND) and the command line of the job."""
    late = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_executor_args(late, defaults=False)
    opts, rest = late.parse_known_args(args.args, namespace=argparse.Namespace(**vars(args)))
    return opts, [opts.target, *rest]


def build_executor(opts: argparse.Namespace, folder: Path, target: str) -> submitit.Executor:
    tasks = opts.tasks_per_node or max(opts.gpus_per_node, 1)
    common = dict(name=opts.name or f"mimkit_{target}", timeout_min=opts.timeout, nodes=opts.nodes,
                  tasks_per_node=tasks, gpus_per_node=opts.gpus_per_node, cpus_per_task=opts.cpus_per_task)
    if opts.executor == "local":
        if opts.nodes != 1:
            raise ConfigError(f"--nodes={opts.nodes}: --executor local runs on this machine only; use --nodes 1")
        ex = submitit.LocalExecutor(folder=folder, max_num_timeout=opts.max_timeouts)
        ex.update_parameters(**common, signal_delay_s=opts.signal_delay)
        return ex
    try:
        ex = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=opts.max_timeouts)
    except RuntimeError as e:
        raise ConfigError(f"--executor slurm: {e} (no srun here); use --executor local on this machine") from None
    slurm = dict(slurm_partition=opts.partition, slurm_account=opts.account, slurm_qos=opts.qos,
                 slurm_constraint=opts.constraint, slurm_signal_delay_s=opts.signal_delay, mem_gb=opts.mem,
                 slurm_additional_parameters={"requeue": True})  # requeueable even where JobRequeue=0
    ex.update_parameters(**common, **{k: v for k, v in slurm.items() if v is not None})
    return ex


def make_job(argv: list[str], parser: argparse.ArgumentParser,
             entry: Callable[[list[str]], int]) -> tuple[Job, Callable[[], object]]:
    """Check `mimkit argv...` with `mimkit`'s parser as the command itself would (mistakes surface now, not in
    the job's log), pin its run directory and make --config paths absolute; also returns what prepares the run
    directory. `entry`: mimkit's main(argv), which the job runs."""
    commands = next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if argv[0] not in commands:
        raise ConfigError(f"mimkit submit {argv[0]}: that command is not installed here")
    args = parser.parse_args(argv)
    configs = [str(Path(f).resolve()) for f in args.config]
    out, pinned, prepare = run_dir(args)
    # everything but the overrides and --config files: the command, its sub-command and flags (in order)
    head, skip = [], False
    for a in argv:
        if skip or a == "--config" or a.startswith("--config="):
            skip = a == "--config"
            continue
        if not is_override(a):
            head.append(a)
    job = Job(head, with_overrides(list(args.overrides), pinned), configs, str(out), entry)
    parser.parse_args(job.argv)
    return job, prepare


def submit(argv: list[str], opts: argparse.Namespace, parser: argparse.ArgumentParser,
           entry: Callable[[list[str]], int]) -> tuple[submitit.Job, Path]:
    """Submit `mimkit argv...` (argv[0] in TARGETS) with the executor options `opts`; returns the job and the
    run directory, where jobs.json records the submission. `parser`, `entry`: mimkit's (see make_job)."""
    from .checkpoint import atomic_write_text
    if argv[0] not in TARGETS:
        raise ConfigError(f"mimkit submit: command {argv[0]!r} is not valid; choose one of: {', '.join(TARGETS)}")
    job_fn, prepare = make_job(argv, parser, entry)
    out = Path(job_fn.output_dir)
    executor = build_executor(opts, out / "submitit", argv[0])
    prepare()
    job = executor.submit(job_fn)
    record = {"job_id": job.job_id, "executor": opts.executor, "submitted": time.strftime("%Y-%m-%d %H:%M:%S"),
              "nodes": opts.nodes, "tasks_per_node": executor.parameters.get("tasks_per_node"),
              "command": "mimkit " + shlex.join(job_fn.argv), "stdout": str(job.paths.stdout),
              "stderr": str(job.paths.stderr)}
    jobs_file = out / "jobs.json"
    jobs = json.loads(jobs_file.read_text()) if jobs_file.exists() else []
    atomic_write_text(jobs_file, json.dumps(jobs + [record], indent=2))
    return job, out


def cmd_submit(args: argparse.Namespace) -> int:
    opts, argv = split_args(args)
    job, out = submit(argv, opts, args.build_parser(), args.entry)
    print(f"submitted job {job.job_id} ({opts.executor}); run dir {out}\n"
          f"logs: {job.paths.stdout} (rank 0), {out / 'log.txt'}")
    if not opts.wait:
        return 0
    try:
        job.results()  # one per task
    except (submitit.core.utils.FailedJobError, submitit.core.utils.UncompletedJobError) as e:
        print(f"error: job {job.job_id} failed: {str(e).strip().splitlines()[-1]}")
        return 1
    print(f"job {job.job_id} finished; results in {out}")
    return 0
