"""`mimkit study`: every target at one budget, as one command.

A study file names the settings every cell shares (`data`, `model`, `budget`, `overrides`), the tokenizers the
token cells need (each trained once), the cells (a method, optionally a config file, plus overrides, with `teacher: <cell>` and
`tokenizer: <name>` references) and the probes. The runner orders the steps by their references (teacher cell ->
tokenizer -> cell -> probes; the token analysis last), and each step is an ordinary run directory under the
study's `output_dir`:

    <output_dir>/cells/<cell>/                  pretraining (checkpoints/last.pt, metrics.json, ...)
    <output_dir>/cells/<cell>/probe_<protocol>/ each probe
    <output_dir>/tokenizers/<name>/             tokenizer training
    <output_dir>/analyze_tokens/                `mimkit analyze tokens` over every tokenizer
    <output_dir>/study.json, study.md, figures/ the comparison

A step whose metrics.json exists and whose config equals the one it would run now is skipped; an interrupted one
resumes (pretraining and tokenizers continue from their last checkpoint); one whose config changed runs again
from scratch.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from mimkit.config import ConfigError, diff, flatten, load_yaml, migrate, parse_overrides

PROTOCOLS = ("knn", "linear", "finetune")
STUDY_KEYS = ("output_dir", "data", "model", "budget", "overrides", "tokenizers", "cells", "probes", "probe",
              "baselines")
BASELINES = ("random_init", "pixels")  # probed once, beside the first cell's k-NN and linear probes
CELL_KEYS = ("method", "config", "teacher", "tokenizer", "overrides")
TOKENIZER_KEYS = ("kind", "config", "teacher", "overrides")
# keys that do not change a step's result: a finished step differing only in these is not run again
NEUTRAL = ("output_dir", "overwrite", "resume", "device", "data.num_workers", "data.root", "features.cache",
           "tokenizers", "checkpoint")


@dataclass
class Step:
    """One run of the study: `kind` pretrain | tokenizer | probe | analyze, named `name`, writing `out`."""
    name: str
    kind: str
    out: Path
    files: list[str]
    overrides: list[str]
    needs: list[str] = field(default_factory=list)
    protocol: str = ""  # probes
    cell: str = ""  # probes: the cell they evaluate


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping; got {value!r}")
    return value


def _check_keys(d: dict, valid: tuple[str, ...], where: str) -> None:
    for key in d:
        if key not in valid:
            raise ConfigError(f"unknown key '{key}' in {where}; valid keys: {', '.join(valid)}")


def _overrides(d: dict, where: str) -> list[str]:
    """`overrides:` as a list of key=value strings or a mapping of dotted keys."""
    value = d.get("overrides") or []
    if isinstance(value, dict):
        return [f"{k}={_yaml_value(v)}" for k, v in flatten(value).items()]
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        raise ConfigError(f"{where}.overrides must be a list of key=value strings or a mapping; got {value!r}")
    return list(value)


def _yaml_value(v: Any) -> str:
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip() if not isinstance(v, str) \
        else v


def load_study(path: str, overrides: list[str] = ()) -> dict:
    """The study file with `key=value` overrides applied (dotted, e.g. budget.epochs=5), checked."""
    study = load_yaml(path)
    for key, value in parse_overrides(list(overrides)).items():
        node, parts = study, key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"study override '{key}': '{part}' is a value, not a section")
        node[parts[-1]] = value
    _check_keys(study, STUDY_KEYS, f"study file {path}")
    if not _mapping(study.get("cells"), "cells"):
        raise ConfigError(f"study file {path} names no cells; add e.g. cells: {{mae: {{method: mae}}}}")
    for name in study.get("baselines") or []:
        if name not in BASELINES:
            raise ConfigError(f"baselines: {name!r} is not a baseline; choose from: {', '.join(BASELINES)}")
    for protocol in study.get("probes") or []:
        if protocol not in PROTOCOLS:
            raise ConfigError(f"probes: {protocol!r} is not a protocol; choose from: {', '.join(PROTOCOLS)}")
    return study


def shared_overrides(study: dict) -> list[str]:
    """The data and model keys every pretraining cell shares, then its budget and extra keys."""
    out = [f"data.{k}={_yaml_value(v)}" for k, v in flatten(_mapping(study.get("data"), "data")).items()]
    out += [f"model.{k}={_yaml_value(v)}" for k, v in flatten(_mapping(study.get("model"), "model")).items()]
    out += [f"{k}={_yaml_value(v)}" for k, v in flatten(_mapping(study.get("budget"), "budget")).items()]
    return out + _overrides(study, "study")


def _reference(value: Any, table: dict, what: str, where: str) -> str:
    if value not in table:
        raise ConfigError(f"{where} refers to {what} {value!r}, which the study does not define; defined: "
                          f"{', '.join(table) or 'none'}")
    return value


def cell_steps(study: dict, root: Path) -> list[Step]:
    """The pretraining step of every cell, with its teacher and tokenizer references resolved to files."""
    cells, tokenizers = _mapping(study["cells"], "cells"), _mapping(study.get("tokenizers"), "tokenizers")
    steps = []
    for name, cell in cells.items():
        cell = _mapping(cell, f"cells.{name}")
        _check_keys(cell, CELL_KEYS, f"cells.{name}")
        if "method" not in cell:
            raise ConfigError(f"cells.{name} needs a method, e.g. method: mae")
        extra, needs = [f"method={cell['method']}"], []
        if cell.get("teacher"):
            teacher = _reference(cell["teacher"], cells, "the cell", f"cells.{name}.teacher")
            extra += [f"target.teacher.name=mimkit:{root / 'cells' / teacher / 'checkpoints' / 'last.pt'}",
                      "target.teacher.weights="]
            needs.append(f"cell:{teacher}")
        if cell.get("tokenizer"):
            tok = _reference(cell["tokenizer"], tokenizers, "the tokenizer", f"cells.{name}.tokenizer")
            extra.append(f"target.tokens.tokenizer={root / 'tokenizers' / tok / 'tokenizer.pt'}")
            needs.append(f"tokenizer:{tok}")
        steps.append(Step(f"cell:{name}", "pretrain", root / "cells" / name,
                          [cell["config"]] if cell.get("config") else [],
                          [*shared_overrides(study), *extra, *_overrides(cell, f"cells.{name}")], needs))
    return steps


def tokenizer_steps(study: dict, root: Path) -> list[Step]:
    """The training step of every tokenizer, on the study's data, with its teacher cell resolved."""
    cells, steps = _mapping(study["cells"], "cells"), []
    data = [f"data.{k}={_yaml_value(v)}" for k, v in flatten(_mapping(study.get("data"), "data")).items()]
    for name, tok in _mapping(study.get("tokenizers"), "tokenizers").items():
        tok = _mapping(tok, f"tokenizers.{name}")
        _check_keys(tok, TOKENIZER_KEYS, f"tokenizers.{name}")
        if "kind" not in tok and "config" not in tok:
            raise ConfigError(f"tokenizers.{name} needs a kind or a config file")
        extra = [f"kind={tok['kind']}"] if "kind" in tok else []
        needs = []
        if tok.get("teacher"):
            teacher = _reference(tok["teacher"], cells, "the cell", f"tokenizers.{name}.teacher")
            extra += [f"teacher.name=mimkit:{root / 'cells' / teacher / 'checkpoints' / 'last.pt'}", "teacher.weights="]
            needs.append(f"cell:{teacher}")
        patch = _mapping(study.get("model"), "model").get("patch_size")
        extra += [f"patch_size={patch}"] if patch else []
        steps.append(Step(f"tokenizer:{name}", "tokenizer", root / "tokenizers" / name,
                          [tok["config"]] if tok.get("config") else [],
                          [*data, *extra, *_overrides(tok, f"tokenizers.{name}")], needs))
    return steps


def probe_steps(study: dict, cells: list[Step]) -> list[Step]:
    """Each probe of each cell, with configs/probe/<protocol>_<data.name>.yaml when it exists; the study's
    baselines ride on the first cell's k-NN and linear probes."""
    dataset = _mapping(study.get("data"), "data").get("name", "digits")
    extra = _mapping(study.get("probe"), "probe")
    steps = []
    for i, cell in enumerate(cells):
        for protocol in study.get("probes") or []:
            preset = Path(__file__).resolve().parent.parent / "configs" / "probe" / f"{protocol}_{dataset}.yaml"
            files = [str(preset)] if preset.is_file() else []
            overrides = _overrides(_mapping(extra.get(protocol), f"probe.{protocol}"), f"probe.{protocol}")
            if i == 0 and protocol in ("knn", "linear"):  # the baselines do not depend on the cell: probe them once
                overrides += [f"{protocol}.{b}=true" for b in study.get("baselines") or []]
            steps.append(Step(f"probe:{cell.name[5:]}:{protocol}", "probe", cell.out / f"probe_{protocol}", files,
                              overrides, [cell.name], protocol=protocol, cell=cell.name[5:]))
    return steps


def order(steps: list[Step]) -> list[Step]:
    """Steps in dependency order (stable: the file's order where references allow); a cycle is an error."""
    done, out = set(), []
    pending = list(steps)
    while pending:
        ready = [s for s in pending if all(n in done for n in s.needs)]
        if not ready:
            raise ConfigError("the study's references form a cycle: " + ", ".join(
                f"{s.name} needs {', '.join(n for n in s.needs if n not in done)}" for s in pending))
        for s in ready:
            out.append(s)
            done.add(s.name)
        pending = [s for s in pending if s.name not in done]
    return out


def plan(study: dict) -> list[Step]:
    """Every step of the study, in the order they run."""
    root = Path(study.get("output_dir") or "runs/study")
    cells = cell_steps(study, root)
    probes = probe_steps(study, cells)
    steps = []
    for step in order([*cells, *tokenizer_steps(study, root)]):  # each cell's probes right after it
        steps += [step, *(p for p in probes if p.needs == [step.name])]
    if study.get("tokenizers"):
        data = [f"data.{k}={_yaml_value(v)}" for k, v in flatten(_mapping(study.get("data"), "data")).items()]
        steps.append(Step("analyze:tokens", "analyze", root / "analyze_tokens", [], data,
                          [f"tokenizer:{n}" for n in study["tokenizers"]]))
    return steps


def check_configs(steps: list[Step]) -> None:
    """Build every cell's and tokenizer's config (keys, types, choices), so that a mistake in any of them is
    one error before the first step runs; the files they will read are checked when they start."""
    for step in steps:
        if step.kind in ("pretrain", "tokenizer"):
            try:
                (check_pretrain if step.kind == "pretrain" else check_tokenizer)(step)
            except ConfigError as e:
                raise ConfigError(f"{step.name}: {e}") from None


def changed_keys(out: Path, cfg) -> list[str] | None:
    """None when `out` holds no run; else the keys whose value differs from `cfg` (neutral keys aside)."""
    saved = out / "config.yaml"
    if not saved.is_file():
        return None
    old = migrate(flatten(load_yaml(saved)))  # a tag or syntax error there is one line
    # keys a newer mimkit added are not a change (as for resume=auto): a study outlives upgrades
    return [k for k in diff(old, cfg) if k in old and not k.startswith(NEUTRAL)]


def _flag(overwrite: bool) -> list[str]:
    return ["overwrite=true"] if overwrite else []


def build_pretrain(step: Step, overwrite: bool = False) -> tuple[Any, None]:
    from mimkit.pretrain_config import pretrain_config  # the plain tables: a study's config check needs no torch
    return pretrain_config(step.files, [*step.overrides, f"output_dir={step.out}", *_flag(overwrite)]), None


def check_pretrain(step: Step) -> None:
    """A cell's config, with pretraining's cross-field checks (e.g. target.ema.top_k against the encoder's depth)."""
    from mimkit.pretrain_config import validate
    validate(build_pretrain(step)[0])


def build_tokenizer(step: Step, overwrite: bool = False) -> tuple[Any, None]:
    from mimkit.tokenizers.config import tokenizer_config
    return tokenizer_config(step.files, [*step.overrides, f"output_dir={step.out}", *_flag(overwrite)]), None


def check_tokenizer(step: Step) -> None:
    """A tokenizer step's config: first from the plain tables (keys, types, choices, kind, shared ranges: a mistake
    there is reported without torch), then with what the kinds decide (a vocabulary their settings imply)."""
    from mimkit.tokenizer_config import build, validate_shared
    validate_shared(build(step.files, [*step.overrides, f"output_dir={step.out}"]))
    build_tokenizer(step)


def build_probe(step: Step, overwrite: bool = False) -> tuple[Any, dict]:
    from .run import build_probe_config
    ckpt = step.out.parent / "checkpoints" / "last.pt"
    return build_probe_config(step.protocol, str(ckpt), step.files,
                              [*step.overrides, f"output_dir={step.out}", *_flag(overwrite)])


def build_analyze(step: Step, overwrite: bool = False) -> tuple[Any, None]:
    from .semantics import build_analyze_config
    names = [f"{n.split(':', 1)[1]}={step.out.parent / 'tokenizers' / n.split(':', 1)[1] / 'tokenizer.pt'}"
             for n in step.needs]
    cfg, _ = build_analyze_config([], [*step.overrides, *_flag(overwrite)], tokenizers=names, out=str(step.out))
    return cfg, None


def run_pretrain(built: tuple) -> None:
    from mimkit.engine import train
    train(built[0])  # the study's own probes replace the closing k-NN


def run_tokenizer(built: tuple) -> None:
    from mimkit.tokenizers.train import train_tokenizer
    train_tokenizer(built[0])


def run_probe_step(built: tuple) -> None:
    from .run import run_probe
    run_probe(*built)


def run_analyze(built: tuple) -> None:
    from .semantics import analyze_tokens
    analyze_tokens(built[0])


BUILDERS = {"pretrain": build_pretrain, "tokenizer": build_tokenizer, "probe": build_probe, "analyze": build_analyze}
RUNNERS = {"pretrain": run_pretrain, "tokenizer": run_tokenizer, "probe": run_probe_step, "analyze": run_analyze}


def inputs_newer(step: Step, by_name: dict[str, Step]) -> bool:
    """Whether a step this one needs finished after it did (it ran again since, e.g. in another job)."""
    own = step.out / "metrics.json"
    if not own.is_file():
        return False
    mtimes = [(by_name[n].out / "metrics.json").stat().st_mtime for n in step.needs
              if (by_name[n].out / "metrics.json").is_file()]
    return any(t > own.stat().st_mtime for t in mtimes)


def decide(step: Step, stale: bool) -> tuple[str, list[str], tuple | None]:
    """What to do with a step: ran (new), resumed (interrupted with this config), skipped (finished with this
    config and nothing it needs ran again) or reran (its config changed, or `stale`); the changed keys; and the
    built config when it was built to decide and can run as it is (resumed)."""
    if not (step.out / "config.yaml").is_file():
        return "ran", [], None
    if stale:
        return "reran", [], None
    built = BUILDERS[step.kind](step)
    changed = changed_keys(step.out, built[0])
    if changed:
        return "reran", changed, None
    return ("skipped", [], None) if (step.out / "metrics.json").is_file() else ("resumed", [], built)


def execute(step: Step, stale: bool, log: Callable[[str], None]) -> str:
    """Run, resume, rerun or skip the step (see `decide`); returns which."""
    action, changed, built = decide(step, stale)
    if action == "skipped":
        log(f"{step.name}: done, skipped ({step.out})")
        return action
    if action == "reran":
        log(f"{step.name}: {'config changed (' + ', '.join(changed) + ')' if changed else 'an input ran again'}; "
            f"running it again")
    built = built or BUILDERS[step.kind](step, overwrite=action == "reran")
    t0 = time.perf_counter()
    log(f"{step.name}: {'resuming' if action == 'resumed' else 'running'} -> {step.out}")
    RUNNERS[step.kind](built)
    log(f"{step.name}: finished in {time.perf_counter() - t0:.0f} s")
    return action


def run_study(study: dict, log: Callable[[str], None] = print, only: str = "") -> dict:
    """Run (or skip, or resume) every step in order, or only the step named `only` (a job of a submitted
    study), then write study.json, study.md and the figures."""
    steps, fresh, status = plan(study), set(), {}
    check_configs(steps)
    by_name = {s.name: s for s in steps}
    if only and only not in by_name:
        raise ConfigError(f"--only {only!r} is not a step of this study; steps: {', '.join(by_name)}")
    for step in steps if not only else [by_name[only]]:
        status[step.name] = execute(step, any(n in fresh for n in step.needs) or inputs_newer(step, by_name), log)
        if status[step.name] != "skipped":
            fresh.add(step.name)
    from .study_report import write_report
    return write_report(study, steps, status, log)


def describe(steps: list[Step]) -> str:
    """The plan `--dry-run` prints: each step in order with what it needs and where it writes."""
    lines = []
    for i, s in enumerate(steps, 1):
        needs = f" (after {', '.join(s.needs)})" if s.needs else ""
        lines.append(f"{i:3d}. {s.name}{needs} -> {s.out}")
        if s.kind in ("pretrain", "tokenizer"):
            lines.append(f"       {' '.join([*(f'--config {f}' for f in s.files), *s.overrides])}")
    return "\n".join(lines)
