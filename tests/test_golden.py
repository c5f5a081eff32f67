"""Golden values: the six methods, the three tokenizer kinds and the k-NN probe give the numbers recorded before
the targets-as-parts redesign (tests/golden/values.json).

Each pretraining case runs 5 optimizer steps (one per epoch) on the synthetic dataset with seed 0 through
`mimkit pretrain` and checks the 5 losses and every weight of the final checkpoint; each tokenizer case checks
the tokenizer file's weights and held-out metrics; the probe case checks every k-NN accuracy.

On a CPU of the kind the values were recorded on (same vendor, vector extensions, thread count and torch
version) everything must be bitwise equal. Elsewhere BLAS kernels of another instruction set sum in another
order, so bitwise equality is not defined: losses and per-tensor sums are compared with a relative tolerance of
1e-3 and the accuracies within one test image.

Record anew (only when a change is *meant* to alter the numbers): MIMKIT_RECORD_GOLDEN=1 pytest tests/test_golden.py
"""
import hashlib
import json
import os
import platform
from pathlib import Path

import pytest
import torch

from benchmarks.common import cpu_description
from mimkit.cli import main

GOLDEN = Path(__file__).parent / "golden" / "values.json"
RECORD = os.environ.get("MIMKIT_RECORD_GOLDEN") == "1"
STEPS = ["data.name=synthetic", "data.synthetic_size=32", "batch_size=32", "epochs=5", "seed=0", "vis_every=5"]


def machine() -> dict:
    cpu = cpu_description()
    return {"arch": platform.machine(), "vendor": cpu["vendor"], "isa": cpu["isa"], "threads": torch.get_num_threads(),
            "torch": torch.__version__}


def tensors_digest(state: dict) -> dict:
    """sha256 over every tensor's name and bytes (sorted by name), and each tensor's float64 sum."""
    h = hashlib.sha256()
    sums = {}
    for k in sorted(state):
        v = state[k]
        if not torch.is_tensor(v):
            continue
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        sums[k] = float(v.double().sum()) if v.is_floating_point() else int(v.sum())
    return {"sha256": h.hexdigest(), "sums": sums}


@pytest.fixture(scope="module")
def golden():
    recorded = {} if RECORD else json.loads(GOLDEN.read_text())
    got = {"machine": machine()}
    yield recorded, got
    if RECORD:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")


def same_machine(recorded: dict) -> bool:
    return recorded.get("machine") == machine()


def check(golden, name: str, value: dict) -> None:
    recorded, got = golden
    got[name] = value
    if RECORD:
        return
    want = recorded[name]
    if same_machine(recorded):
        assert value == want, f"{name} differs from its golden values"
        return
    for key, w in want.items():
        v = value[key]
        if key == "digest":
            assert v["sums"].keys() == w["sums"].keys()
            for k in w["sums"]:
                assert v["sums"][k] == pytest.approx(w["sums"][k], rel=1e-3, abs=1e-3), (name, k)
        elif isinstance(w, list):
            assert v == pytest.approx(w, rel=1e-3), (name, key)
        elif isinstance(w, dict):
            assert v == pytest.approx(w, abs=2.0), (name, key)  # k-NN accuracies in %: about one image
        elif isinstance(w, float):
            assert v == pytest.approx(w, abs=2.0), (name, key)
        else:
            assert v == w, (name, key)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("golden")


def pretrain(runs: Path, name: str, *overrides: str) -> dict:
    out = runs / name
    assert main(["pretrain", *STEPS, f"output_dir={out}", *overrides]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    value = {"losses": metrics["loss_history"], "digest": tensors_digest(ckpt["model"])}
    if "knn" in metrics:
        value["knn"] = {k: v for k, v in metrics["knn"]["pretrained"].items() if k.startswith("top")}
    return value


def tokenizer(runs: Path, name: str, *overrides: str) -> Path:
    out = runs / name
    assert main(["tokenizer", "train", "data.name=synthetic", "seed=0", f"output_dir={out}", *overrides]) == 0
    return out


def tokenizer_value(out: Path) -> dict:
    tok = torch.load(out / "tokenizer.pt", weights_only=True)
    metrics = json.loads((out / "metrics.json").read_text())
    return {"digest": tensors_digest(tok["state"]), "losses": metrics.get("loss_history", []),
            "heldout": [metrics["heldout_usage"], metrics["heldout_perplexity"]]}


@pytest.fixture(scope="module")
def mae_run(runs):
    return pretrain(runs, "mae", "method=mae", "probe.enabled=true")


def test_mae(golden, mae_run):
    check(golden, "mae", mae_run)


@pytest.mark.parametrize("method", ["simmim", "maskfeat"])
def test_pixel_and_hog_methods(golden, runs, method):
    check(golden, method, pretrain(runs, method, f"method={method}"))


@pytest.fixture(scope="module")
def tokenizers(runs, mae_run):
    small = ["batch_size=32", "data.synthetic_size=64", "epochs=2", "vocab_size=32", "patch_size=4"]
    files = {
        "kmeans": tokenizer(runs, "tok_kmeans", "kind=kmeans", "vocab_size=16", "kmeans.max_samples=4096"),
        "dvae": tokenizer(runs, "tok_dvae", "kind=dvae", *small, "dvae.input_size=8", "dvae.groups=2",
                          "dvae.hidden=16", "dvae.blocks_per_group=1"),
        "vqkd": tokenizer(runs, "tok_vqkd", "kind=vqkd", *small, f"teacher.name=mimkit:{runs}/mae/checkpoints/last.pt",
                          "vqkd.embed_dim=32", "vqkd.depth=1", "vqkd.num_heads=4", "vqkd.code_dim=8",
                          "vqkd.decoder_embed_dim=32", "vqkd.decoder_num_heads=4"),
    }
    return files


@pytest.mark.parametrize("kind", ["kmeans", "dvae", "vqkd"])
def test_tokenizer_files(golden, tokenizers, kind):
    check(golden, f"tokenizer_{kind}", tokenizer_value(tokenizers[kind]))


@pytest.mark.parametrize("method,kind", [("beit", "dvae"), ("beitv2", "vqkd"), ("clustermim", "kmeans")])
def test_token_methods(golden, runs, tokenizers, method, kind):
    check(golden, method, pretrain(runs, method, f"method={method}",
                                   f"target.tokens.tokenizer={tokenizers[kind] / 'tokenizer.pt'}"))


def test_knn_probe(golden, runs, mae_run):
    out = runs / "probe_knn"
    assert main(["probe", "knn", "--checkpoint", str(runs / "mae" / "checkpoints" / "last.pt"),
                 f"output_dir={out}", "data.synthetic_size=256"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    check(golden, "probe_knn", {k: v for k, v in metrics.items() if k.startswith(("top", "random_init"))})
