"""`python -m benchmarks quality --dry-run`: mimkit's and lightly's MAE trained side by side on tiny data, with the
k-NN probe at random init and after every epoch (the full run is an hour-long benchmark, not a test)."""
import pytest

pytest.importorskip("lightly.models.modules", reason="lightly is a benchmark extra (benchmarks/requirements.txt)")


def test_quality_dry_run_trains_both_sides_and_probes_every_epoch():
    from benchmarks.quality import run
    r = run(dry_run=True)
    for side in ("mimkit", "lightly"):
        assert len(r["knn_curves"][side]) == 3 and len(r["loss_curves"][side]) == 2  # init + 2 epochs
        assert all(0 <= c[p] <= 100 for c in r["knn_curves"][side] for p in ("cls", "mean"))
        assert all(0 < loss < 10 for loss in r["loss_curves"][side]) and r["train_seconds"][side] > 0
    assert r["wall_time_ratio_lightly_over_mimkit"] > 0 and "cpu" in r["machine"]
