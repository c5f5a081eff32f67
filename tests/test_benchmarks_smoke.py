"""The benchmark entry points import and run end to end on the tiny preset (no timing is checked: speed is
measured by `python -m benchmarks`, never asserted in tests)."""
import json

import pytest

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
