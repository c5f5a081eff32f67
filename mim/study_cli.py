"""`mimkit study --config STUDY.yaml [key=value ...] [--dry-run] [--only STEP] [--executor slurm|local ...]`.

Part of the command line (it reaches pretraining, tokenizers, probes and the token analysis, see
mimkit.probes.study). Without `--executor` the study runs here, step after step. With it, each step that is not
done becomes a submitit job running `mimkit study --only <step>` on the same study file: on SLURM, with
`--dependency=afterok:<jobs of the steps it needs>`; with `--executor local`, one after another on this machine.
"""
from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path

from .submit import Job, add_executor_args, build_executor

EPILOG = """A study file names data/model/budget shared by every cell, the tokenizers, the cells (method + overrides,
`teacher: <cell>`, `tokenizer: <name>`) and the probes; see configs/study/*.yaml.
examples:
  mimkit study --config configs/study/digits.yaml --dry-run          # the plan: steps, order, commands
  mimkit study --config configs/study/digits.yaml                    # run it here (resumes, skips what is done)
  mimkit study --config configs/study/cifar10_cpu.yaml data.root=/data/cifar10 budget.epochs=1
  mimkit study --config configs/study/imagenet_vitb.yaml --executor slurm --gpus-per-node 8 --partition gpu"""


def dependency(step, job_ids: dict[str, str]) -> str:
    """SLURM's --dependency for a step: afterok on the jobs of the steps it needs that were submitted ("" when
    they were all done already)."""
    ids = [job_ids[n] for n in step.needs if n in job_ids]
    return "afterok:" + ":".join(ids) if ids else ""


def submit_study(args: argparse.Namespace, study: dict, steps: list) -> dict[str, str]:
    """One job per step not done (in plan order), chained by dependencies; returns {step: job id} and records
    the submissions in <output_dir>/jobs.json."""
    from mimkit.probes.study import decide

    from .checkpoint import atomic_write_text
    root, config = Path(study.get("output_dir") or "runs/study"), str(Path(args.config).resolve())
    job_ids, jobs, records = {}, {}, []
    for step in steps:
        if all(n not in job_ids for n in step.needs) and decide(step, False)[0] == "skipped":
            continue
        executor = build_executor(args, root / "submitit" / step.name.replace(":", "_"), "study")
        after = dependency(step, job_ids)
        if after and args.executor == "slurm":
            executor.update_parameters(slurm_additional_parameters={"requeue": True, "dependency": after})
        for name in step.needs:  # no scheduler here: wait for what the step needs
            if args.executor == "local" and name in jobs:
                jobs[name].wait()
        job_fn = Job(["study", "--only", step.name], list(args.overrides), [config], str(step.out), args.entry)
        jobs[step.name] = executor.submit(job_fn)
        job_ids[step.name] = jobs[step.name].job_id
        records.append({"step": step.name, "job_id": job_ids[step.name], "dependency": after,
                        "command": "mimkit " + shlex.join(job_fn.argv), "stdout": str(jobs[step.name].paths.stdout),
                        "submitted": time.strftime("%Y-%m-%d %H:%M:%S")})
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / "jobs.json", json.dumps(records, indent=2))
    if args.wait:
        for job in jobs.values():
            job.wait()
    return job_ids


def cmd_study(args: argparse.Namespace) -> int:
    from mimkit.probes.study import check_configs, describe, load_study, plan, run_study
    study = load_study(args.config, args.overrides)
    steps = plan(study)
    check_configs(steps)
    root = Path(study.get("output_dir") or "runs/study")
    if args.dry_run:
        print(describe(steps))
        print(f"{sum(s.kind == 'pretrain' for s in steps)} cells, {sum(s.kind == 'tokenizer' for s in steps)} "
              f"tokenizers, {sum(s.kind == 'probe' for s in steps)} probes; nothing was run (--dry-run)")
        return 0
    if args.executor:
        job_ids = submit_study(args, study, steps)
        print(f"submitted {len(job_ids)} jobs ({args.executor}); the rest was done -> {root / 'jobs.json'}")
        return 0
    report = run_study(study, only=args.only)
    best = report["rows"][0] if report["rows"] else {}
    print(f"study: {len(report['rows'])} cells; best {best.get('cell')} -> {root / 'study.md'}")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("study", help="every target at one budget: cells, tokenizers, probes, one table",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, metavar="STUDY.yaml", help="the study file (configs/study/*.yaml)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (steps, order, commands); run nothing")
    p.add_argument("--only", default="", metavar="STEP", help="run one step of the plan (what each job runs)")
    add_executor_args(p)
    p.set_defaults(executor=None)  # no --executor: run here
    next(a for a in p._actions if a.dest == "executor").help = ("submit each step as a job: slurm (sbatch through "
                                                                "submitit, chained by dependencies) or local; "
                                                                "default: run here")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides of the study file")
    p.set_defaults(func=cmd_study)
