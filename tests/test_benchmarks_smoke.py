"""The benchmark entry points import and run end to end on the tiny preset (no timing is checked: speed is
measured by `python -m benchmarks`, never asserted in tests)."""
import json

import pytest
import torch

from benchmarks.__main__ import main


def test_step_peer_machine_entry_points_write_results(tmp_path, monkeypatch):
    monkeypatch.setenv("MIMKIT_BENCH_RESULTS", str(tmp_path))
    main(["step", "peer", "machine", "--preset", "tiny", "--repeats", "1", "--methods", "mae", "simmim", "clustermim",
          "eva"])
    step = json.loads((tmp_path / "step.json").read_text())
    assert [r["method"] for r in step["rows"]] == ["mae", "simmim", "clustermim", "eva"], step["skipped"]
    assert step["machine"]["torch"] and all(r["images_per_s"] > 0 for r in step["rows"])
    assert step["rows"][2]["target_overhead"]["target"] == "tokens"  # clustermim: an in-process k-means tokenizer
    assert step["rows"][3]["target_overhead"]["target"] == "teacher"  # eva: a random encoder as teacher
    peer = json.loads((tmp_path / "peer.json").read_text())
    assert peer["rows"]["mimkit"]["flops_per_step"] > 0
    machine = json.loads((tmp_path / "machine.json").read_text())
    assert machine["fractions"]["mimkit"]["median"] > 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["rows"]) == {"step", "peer", "machine"}
    if "lightly" in peer["rows"]:  # the same model, counted the same way: the peer does the same work
        ours, theirs = peer["rows"]["mimkit"]["flops_per_step"], peer["rows"]["lightly"]["flops_per_step"]
        assert abs(ours - theirs) / ours < 0.05


def test_bad_overrides_and_names_stop_with_one_error_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MIMKIT_BENCH_RESULTS", str(tmp_path))
    for args, culprit in ((["step", "--set", "precsion=bf16"], "precsion"), (["step", "--methods", "maee"], "maee"),
                          (["nosuch"], "nosuch"), (["step", "--repeats", "0"], "--repeats")):
        with pytest.raises(SystemExit) as e:
            main(["--preset", "tiny", "--repeats", "1", *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "Traceback" not in err, err
        assert "error:" in err.splitlines()[-1] and culprit in err.splitlines()[-1], err
    assert not (tmp_path / "step.json").exists()


def test_gpu_check_dry_run_writes_every_part(tmp_path, monkeypatch):
    """`python -m benchmarks gpu --dry-run`: the GPU check's code path on the CPU (what a GPU machine runs blind)."""
    monkeypatch.setenv("MIMKIT_BENCH_RESULTS", str(tmp_path))
    main(["gpu", "--dry-run", "--out", str(tmp_path / "gpu")])
    r = json.loads((tmp_path / "gpu" / "gpu.json").read_text())
    assert {n: p["status"] for n, p in r["parts"].items()} == dict.fromkeys(("tests", "eager", "compiled", "loader"),
                                                                           "ok"), r["parts"]
    if not torch.cuda.is_available():  # collected, marked and skipped
        assert set(r["parts"]["tests"]["counts"]) == {"skipped"} and r["parts"]["tests"]["counts"]["skipped"] >= 6
    eager = r["parts"]["eager"]["rows"]  # MAE at two batch sizes, a tokenizer target, a teacher target
    assert [(x["method"], x["batch"]) for x in eager] == [("mae", 8), ("mae", 4), ("clustermim", 8), ("eva", 8)]
    assert all(x["images_per_s"] > 0 for x in eager), [x.get("error") for x in eager]
    assert r["parts"]["compiled"]["rows"][0]["images_per_s"] > 0
    assert set(r["mae_flops_fraction"]) == {"eager batch 8", "eager batch 4", "compiled batch 8"}
    assert r["parts"]["loader"]["per_core"]["images_per_s"]["mimkit"] > 0
    md = (tmp_path / "gpu" / "gpu.md").read_text()
    assert "| mae | 8 |" in md and "| loader | images/s |" in md


def test_gpu_check_records_a_failing_part_and_goes_on(tmp_path, monkeypatch):
    from benchmarks import gpu

    def broken(rec, dry_run):
        raise RuntimeError("no decoder here")

    def slow(rec, compiled, dry_run):
        import time
        time.sleep(5)
    monkeypatch.setattr(gpu, "run_loader", broken)
    monkeypatch.setattr(gpu, "run_steps", slow)
    monkeypatch.setattr(gpu, "run_tests", lambda rec, s, dry: rec.update(counts={}))
    monkeypatch.setitem(gpu.BUDGETS, "eager", 6)  # 1 s after the reserve
    r = gpu.run(dry_run=True, out=str(tmp_path))
    assert r["parts"]["eager"]["status"] == "out of time" and r["parts"]["eager"]["seconds"] < 3
    assert r["parts"]["compiled"]["status"] == "out of time" or r["parts"]["compiled"]["seconds"] >= 5
    assert r["parts"]["loader"]["status"] == "failed" and "no decoder here" in r["parts"]["loader"]["error"]
    assert json.loads((tmp_path / "gpu.json").read_text())["parts"]["loader"]["status"] == "failed"


def test_loader_benchmark_compares_with_maes_pipeline(tmp_path, monkeypatch):
    monkeypatch.setenv("MIMKIT_BENCH_RESULTS", str(tmp_path))
    main(["loader", "--preset", "tiny", "--repeats", "1"])
    r = json.loads((tmp_path / "loader.json").read_text())
    assert set(r["per_core"]["images_per_s"]) == {"mae", "mimkit", "mimkit_before", "mimkit_without_mask",
                                                  "mimkit_uint8", "mimkit_uint8_shards"}
    assert r["closeness"]["within_tolerance"], r["closeness"]
    assert r["closeness"]["uint8_normalized_after_the_copy_bitwise_equal"]
    assert r["machine"]["cpu"]["model"]
