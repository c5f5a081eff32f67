"""`mimkit study`: the plan's order, references and errors; a tiny study on the synthetic data that runs, writes
its table and figures, skips what is done, reruns what changed and resumes what was interrupted."""
import json

import pytest
import yaml

from mimkit.cli import main
from mimkit.config import ConfigError
from mimkit.probes.study import load_study, plan, run_study

TINY = {"data": {"name": "synthetic", "limit": 64, "test_limit": 32}, "budget": {"epochs": 1},
        "overrides": ["batch_size=32"], "probes": ["knn"], "baselines": ["pixels"],
        "tokenizers": {"km": {"kind": "kmeans", "overrides": ["vocab_size=8", "kmeans.max_samples=2000"]}},
        "cells": {"mae": {"method": "mae"}, "clustermim": {"method": "clustermim", "tokenizer": "km"}}}


def write(tmp_path, study, name="study.yaml"):
    study = {"output_dir": str(tmp_path / "study"), **study}
    (tmp_path / name).write_text(yaml.safe_dump(study))
    return str(tmp_path / name)


def test_plan_orders_teacher_tokenizer_cell_probes_and_analysis(tmp_path):
    study = dict(TINY, tokenizers={**TINY["tokenizers"], "vq": {"kind": "vqkd", "teacher": "mae"}},
                 cells={"beitv2": {"method": "beitv2", "tokenizer": "vq"}, **TINY["cells"],
                        "eva": {"method": "eva", "teacher": "mae"}})
    names = [s.name for s in plan(load_study(write(tmp_path, study)))]
    assert names.index("cell:mae") < names.index("tokenizer:vq") < names.index("cell:beitv2")
    assert names.index("cell:mae") < names.index("cell:eva")
    assert names[names.index("cell:mae") + 1] == "probe:mae:knn"  # probes right after their cell
    assert names[-1] == "analyze:tokens" and len(names) == len(set(names)) == 4 + 2 + 4 + 1
    steps = {s.name: s for s in plan(load_study(write(tmp_path, study)))}
    assert f"teacher.name=mimkit:{tmp_path / 'study' / 'cells' / 'mae' / 'checkpoints' / 'last.pt'}" in \
        steps["tokenizer:vq"].overrides
    assert "data.name=synthetic" in steps["tokenizer:vq"].overrides and "epochs=1" in steps["cell:eva"].overrides


def test_baselines_ride_on_the_first_cells_probes_only(tmp_path):
    study = dict(TINY, probes=["knn", "linear"], baselines=["random_init", "pixels"])
    steps = {s.name: s for s in plan(load_study(write(tmp_path, study)))}
    first, other = "clustermim", "mae"  # the file's order (safe_dump sorts the cells)
    assert {"knn.random_init=true", "knn.pixels=true"} <= set(steps[f"probe:{first}:knn"].overrides)
    assert {"linear.random_init=true", "linear.pixels=true"} <= set(steps[f"probe:{first}:linear"].overrides)
    assert not any("pixels" in o or "random_init" in o
                   for o in steps[f"probe:{other}:knn"].overrides + steps[f"probe:{other}:linear"].overrides)
    with pytest.raises(ConfigError, match="'raw'.*random_init, pixels"):
        load_study(write(tmp_path, dict(TINY, baselines=["raw"])))


def test_a_cell_reads_its_config_file_before_its_overrides(tmp_path):
    from mimkit.probes.study import BUILDERS
    (tmp_path / "d2v.yaml").write_text("method: data2vec2\nmask:\n  clones: 3\n  block_len: 2\n")
    study = dict(TINY, cells={"d2v": {"method": "data2vec2", "config": str(tmp_path / "d2v.yaml"),
                                      "overrides": ["mask.clones=2"]}})
    step = next(s for s in plan(load_study(write(tmp_path, study))) if s.name == "cell:d2v")
    assert step.files == [str(tmp_path / "d2v.yaml")]
    cfg = BUILDERS["pretrain"](step)[0]
    assert (cfg.mask.clones, cfg.mask.block_len) == (2, 2)  # the override wins, the file's other key is kept


@pytest.mark.parametrize("study,words", [
    ({"cells": {"a": {"method": "beit", "tokenizer": "nope"}}}, ["cells.a.tokenizer", "'nope'"]),
    ({"cells": {"a": {"method": "eva", "teacher": "b"}, "b": {"method": "eva", "teacher": "a"}}}, ["cycle"]),
    ({"cells": {"a": {"method": "mae", "tokeniser": "x"}}}, ["tokeniser", "tokenizer"]),
    ({"cells": {}}, ["no cells"]),
    ({"cells": {"a": {"method": "mae"}}, "probes": ["svm"]}, ["svm", "linear"]),
    ({"cells": {"a": {"method": "mae", "overrides": ["optim.bllr=1"]}}}, ["cell:a", "optim.bllr"]),
    ({"cells": {"a": {"method": "mea"}}}, ["cell:a", "mea", "did you mean mae"]),
    # a check that needs two keys (the encoder's depth from the data preset and the method's top_k)
    ({"cells": {"a": {"method": "data2vec2", "overrides": ["target.ema.top_k=13"]}}},
     ["cell:a", "target.ema.top_k=13", "exceeds the encoder"]),
])
def test_bad_study_files_are_one_line_errors_before_anything_runs(tmp_path, capsys, study, words):
    path = write(tmp_path, study)
    assert main(["study", "--config", path]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and all(w in err for w in words), err
    assert not (tmp_path / "study").exists()


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    assert main(["study", "--config", write(tmp_path, TINY), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "cell:clustermim (after tokenizer:km)" in out and "2 cells, 1 tokenizers, 2 probes" in out
    assert not (tmp_path / "study").exists()


def test_shipped_studies_plan(tmp_path):
    from mimkit.methods import METHODS
    study = load_study("configs/study/digits.yaml")
    cells = {s.name for s in plan(study) if s.kind == "pretrain"}
    assert {f"cell:{m}" for m in METHODS} <= {f"cell:{c['method']}" for c in study["cells"].values()} | cells
    with pytest.raises(ConfigError, match="budget.epochs"):
        load_study("configs/study/digits.yaml", ["budget.epochs"])


def test_tiny_study_runs_skips_reruns_and_resumes(tmp_path):
    path = write(tmp_path, TINY)
    first = run_study(load_study(path))
    root = tmp_path / "study"
    assert set(first["steps"].values()) == {"ran"}
    rows = {r["cell"]: r for r in first["rows"]}
    assert rows["clustermim"]["discrete"] and not rows["mae"]["discrete"] and rows["mae"]["family"] == "pixels"
    assert all(r["knn"] is not None and r["train_seconds"] > 0 for r in rows.values())
    assert rows["clustermim"]["tcas_norm"] is not None and rows["mae"]["tcas_norm"] is None
    assert {"random_init_knn", "pixels_knn"} <= set(first["baselines"])  # synthetic preset / the study's baseline
    assert "pixels_knn" in (root / "study.md").read_text()
    assert json.loads((root / "study.json").read_text())["rows"][0]["cell"] in rows
    assert "| clustermim |" in (root / "study.md").read_text()
    for name in ("accuracy", "loss_curves", "tcas_vs_accuracy", "accuracy_vs_time"):
        assert (root / "figures" / f"{name}.png").stat().st_size > 1000, name
    saved = root / "cells" / "mae" / "config.yaml"  # written by an older mimkit that lacked a key
    text = saved.read_text()
    assert "  read_retries: 3\n" in text
    saved.write_text(text.replace("  read_retries: 3\n", ""))
    again = run_study(load_study(path))
    assert set(again["steps"].values()) == {"skipped"}
    # a changed cell runs again from scratch, with its probes; the rest is skipped
    changed = run_study(load_study(path, ["cells.mae.overrides=[batch_size=16]"]))
    assert changed["steps"]["cell:mae"] == "reran" and changed["steps"]["probe:mae:knn"] == "reran"
    assert changed["steps"]["cell:clustermim"] == "skipped"
    # an interrupted cell (no metrics.json yet) resumes from its checkpoint
    (root / "cells" / "clustermim" / "metrics.json").unlink()
    resumed = run_study(load_study(path, ["cells.mae.overrides=[batch_size=16]"]))
    assert resumed["steps"]["cell:clustermim"] == "resumed" and resumed["steps"]["probe:clustermim:knn"] == "reran"


def test_report_of_a_study_whose_cells_have_not_all_run(tmp_path):
    """A submitted study's job (`--only STEP`) writes the report while other cells have not started: their rows
    stay empty, the method comes from the study file, and nothing fails."""
    from mimkit.probes.study_report import write_report
    study = load_study(write(tmp_path, TINY))
    done = tmp_path / "study" / "cells" / "mae"
    (done / "probe_knn").mkdir(parents=True)
    (done / "config.yaml").write_text(yaml.safe_dump({"method": "mae", "target": {"kind": "pixels"}}))
    (done / "probe_knn" / "metrics.json").write_text(json.dumps({"top1": 41.5}))
    report = write_report(study, plan(study), {}, log=lambda _: None)
    rows = {r["cell"]: r for r in report["rows"]}
    assert rows["mae"]["knn"] == 41.5 and rows["mae"]["family"] == "pixels"
    assert rows["clustermim"]["method"] == "clustermim" and rows["clustermim"]["knn"] is None
    assert rows["clustermim"]["discrete"] is None and rows["mae"]["discrete"] is False  # not run: not known yet
    assert "| clustermim | clustermim |  | — |" in (tmp_path / "study" / "study.md").read_text()


def test_submitted_study_chains_its_steps_by_dependencies(tmp_path):
    from mimkit.study_cli import dependency
    steps = {s.name: s for s in plan(load_study(write(tmp_path, TINY)))}
    ids = {"cell:mae": "11", "tokenizer:km": "12"}
    assert dependency(steps["probe:mae:knn"], ids) == "afterok:11"
    assert dependency(steps["cell:clustermim"], ids) == "afterok:12"
    assert dependency(steps["cell:mae"], ids) == "" and dependency(steps["analyze:tokens"], {}) == ""


def test_cifar_study_gives_every_cell_one_budget_and_one_learning_rate(tmp_path):
    """cifar10_cpu.yaml compares targets at an equal budget: every cell sees the same images, batch and epochs at
    the same learning rate (the recipes' reference batches differ: EVA's lr is per 4096, BEiT's per 2048)."""
    from mimkit.loop import effective_lr
    from mimkit.probes.study import build_pretrain
    study = load_study("configs/study/cifar10_cpu.yaml", [f"output_dir={tmp_path}", "data.root=/data/cifar10"])
    seen = {}
    for step in plan(study):
        if step.kind == "pretrain":
            cfg = build_pretrain(step)[0]
            seen[step.name] = (effective_lr(cfg), cfg.batch_size, cfg.epochs, cfg.data.limit, cfg.model.arch)
    assert len(seen) == len(study["cells"]) and len(set(seen.values())) == 1, seen


@pytest.mark.slow
def test_local_executor_runs_every_step_as_a_job(tmp_path):
    study = {"data": TINY["data"], "budget": TINY["budget"], "overrides": TINY["overrides"], "probes": ["knn"],
             "cells": {"mae": {"method": "mae"}}}
    path = write(tmp_path, study)
    assert main(["study", "--config", path, "--executor", "local", "--gpus-per-node", "0", "--wait"]) == 0
    jobs = json.loads((tmp_path / "study" / "jobs.json").read_text())
    assert [j["step"] for j in jobs] == ["cell:mae", "probe:mae:knn"]
    assert jobs[1]["dependency"] == f"afterok:{jobs[0]['job_id']}" and "--only probe:mae:knn" in jobs[1]["command"]
    assert (tmp_path / "study" / "cells" / "mae" / "probe_knn" / "metrics.json").is_file()
    assert (tmp_path / "study" / "study.md").is_file()
    # submitted again: everything is done, nothing is submitted
    assert main(["study", "--config", path, "--executor", "local", "--gpus-per-node", "0", "--wait"]) == 0
    assert json.loads((tmp_path / "study" / "jobs.json").read_text()) == []


@pytest.mark.slow
def test_a_two_cell_slice_of_the_digits_study(tmp_path):
    """The shipped digits study, cut to MAE and ClusterMIM (pixel k-means) at 1 epoch: its tokenizer, cells,
    probes and analysis run as configured."""
    study = load_study("configs/study/digits.yaml", [f"output_dir={tmp_path / 'study'}", "budget.epochs=1"])
    study["cells"] = {k: study["cells"][k] for k in ("mae", "clustermim")}
    study["tokenizers"] = {"kmeans_pixels": study["tokenizers"]["kmeans_pixels"]}
    report = run_study(study)
    assert set(report["steps"]) == {"cell:mae", "probe:mae:knn", "probe:mae:linear", "tokenizer:kmeans_pixels",
                                    "cell:clustermim", "probe:clustermim:knn", "probe:clustermim:linear",
                                    "analyze:tokens"}
    rows = {r["cell"]: r for r in report["rows"]}
    assert all(r["knn"] > 10 and r["linear"] > 10 for r in rows.values())  # above chance over 10 digits
    assert rows["clustermim"]["usage"] > 0.5 and 0 <= rows["clustermim"]["tcas_norm"] <= 1
