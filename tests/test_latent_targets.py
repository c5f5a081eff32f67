"""The EMA teacher (target.kind=ema) and the methods built on it, data2vec 2.0 and I-JEPA: the update and the
momentum schedule by hand, data2vec 2.0's top-K instance-norm average against a plain reference, the teacher
outside the optimizer and inside the checkpoint, short runs, bitwise resume and the shipped configs."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO
from mimkit.checkpoint import load
from mimkit.cli import main
from mimkit.encoders import load_encoder
from mimkit.engine import train
from mimkit.loop import build_optimizer
from mimkit.masking import build_mask_generator
from mimkit.methods import build_method, pretrain_config, validate
from mimkit.targets.ema import EMAConfig, EMATeacher, average_top_k
from mimkit.targets.base import TargetContext
from mimkit.vit import ViT

# the synthetic set (16 px) at patch 2: an 8x8 grid, large enough for I-JEPA's blocks
D2V = ["method=data2vec2", "target.ema.top_k=2", "mask.block_len=2", "mask.clones=2", "data2vec2.cls_loss=0.001"]
JEPA = ["method=ijepa", "model.patch_size=2", "mask.min_keep=4", "predictor.depth=1", "predictor.embed_dim=32",
        "optim.lr_batch_ref=256"]


def small_vit(seed):
    torch.manual_seed(seed)
    return ViT(img_size=8, patch_size=2, embed_dim=32, depth=3, num_heads=2)


def teacher_of(student, **cfg):
    ema = EMATeacher(EMAConfig(**cfg), TargetContext(8, 2, "synthetic"))
    ema.follow(student)
    return ema


def test_ema_update_by_hand():
    student = small_vit(0)
    ema = teacher_of(student, momentum=0.9, momentum_end=0.99, anneal_end=0.5)
    assert all(torch.equal(t, s) for t, s in zip(ema.teacher.parameters(), student.parameters()))  # a copy
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    before = [t.clone() for t in ema.teacher.parameters()]
    ema.update(student, progress=0.25)  # m = 0.9 + (0.99 - 0.9) * 0.25 / 0.5 = 0.945
    for t0, t, s in zip(before, ema.teacher.parameters(), student.parameters()):
        torch.testing.assert_close(t, 0.945 * t0 + 0.055 * s, rtol=0, atol=1e-6)
    assert ema.momentum_now.item() == pytest.approx(0.945)
    assert not any(t.requires_grad for t in ema.teacher.parameters())


def test_momentum_schedule():
    ema = teacher_of(small_vit(0), momentum=0.996, momentum_end=1.0, anneal_end=0.5)
    assert [ema.momentum(p) for p in (0.0, 0.25, 0.5, 0.9)] == pytest.approx([0.996, 0.998, 1.0, 1.0])
    ema = teacher_of(small_vit(0), momentum=0.9998, momentum_end=0.99999)  # over the whole run
    assert ema.momentum(0.5) == pytest.approx((0.9998 + 0.99999) / 2)


def reference_targets(layers, eps=1e-5):
    """data2vec 2.0's target written plainly: per sample and channel, (x - mean over patches) / sqrt(biased var
    + eps); the mean over layers; per patch, (y - mean over channels) / sqrt(biased var + eps)."""
    B, N, D = layers[0].shape
    y = torch.zeros(B, N, D, dtype=torch.float64)
    for x in layers:
        x = x.double()
        for b in range(B):
            for d in range(D):
                col = x[b, :, d]
                y[b, :, d] += (col - col.mean()) / math.sqrt(col.var(unbiased=False) + eps)
    y /= len(layers)
    for b in range(B):
        for n in range(N):
            row = y[b, n]
            y[b, n] = (row - row.mean()) / math.sqrt(row.var(unbiased=False) + eps)
    return y


def test_top_k_instance_norm_average_matches_the_reference():
    layers = [torch.randn(2, 5, 6) * (i + 1) + i for i in range(3)]
    torch.testing.assert_close(average_top_k(layers, True, True).double(), reference_targets(layers),
                               rtol=0, atol=1e-5)
    assert torch.equal(average_top_k(layers, False, False), torch.stack(layers).mean(0))


def test_teacher_reads_the_last_k_blocks_ffn_outputs():
    student = small_vit(1).eval()
    imgs = torch.randn(2, 3, 8, 8)
    with torch.no_grad():  # the blocks run by hand: x + attn, then the FFN's output before its residual
        x, ffn = student.embed(imgs), []
        for blk in student.blocks:
            x = x + blk.attn(blk.norm1(x))
            f = blk.mlp(blk.norm2(x))
            ffn.append(f[:, 1:])
            x = x + f
        out = F.layer_norm(student.norm(x)[:, 1:], (32,))
    d2v = teacher_of(student, top_k=2, instance_norm=True, norm="layernorm")
    torch.testing.assert_close(d2v(imgs).double(), reference_targets(ffn[-2:]), rtol=0, atol=1e-5)
    jepa = teacher_of(student, top_k=0, norm="layernorm")
    torch.testing.assert_close(jepa(imgs), out, rtol=0, atol=1e-5)


@pytest.mark.parametrize("args", [D2V, JEPA], ids=["data2vec2", "ijepa"])
def test_teacher_is_outside_the_optimizer_and_inside_the_checkpoint(cfg_factory, args):
    cfg = cfg_factory(*args)
    model = build_method(cfg)
    teacher = {id(p) for p in model.target.teacher.parameters()}
    in_optimizer = {id(p) for g in build_optimizer(model, cfg, torch.device("cpu")).param_groups for p in g["params"]}
    assert teacher and not teacher & in_optimizer
    assert {id(p) for p in model.encoder.parameters()} <= in_optimizer
    assert any(k.startswith("target.teacher.blocks.") for k in model.state_dict())
    model.train()
    assert model.encoder.training and not model.target.teacher.training  # never drops paths


def short_run(tmp_path, name, *args):
    return train(pretrain_config([], ["data.name=digits", "data.limit=192", "batch_size=32", "epochs=3",
                                      "model.depth=2", "model.embed_dim=64", "optim.warmup_epochs=1",
                                      "optim.blr=4e-3", "probe.enabled=false", f"output_dir={tmp_path / name}",
                                      *args]))


# a collapsed target has a per-dimension std near 0; LayerNorm'd targets of a random teacher start near 0.3
STD_FLOOR = 0.1


def test_data2vec2_digits_run_learns_without_collapse(tmp_path):
    m = short_run(tmp_path, "d2v", "method=data2vec2", "mask.block_len=2", "mask.clones=2", "target.ema.top_k=2",
                  "target.ema.momentum=0.99", "target.ema.momentum_end=0.999", "target.ema.anneal_end=1")
    assert m["final_loss"] < 0.8 * m["first_loss"], m["loss_history"]
    assert m["final_target_std"] > STD_FLOOR and m["final_pred_std"] > 0
    ckpt = load(tmp_path / "d2v" / "checkpoints" / "last.pt")
    # the engine's progress: the last of U updates used the momentum at (U - 1) / U
    updates = ckpt["step"]
    assert ckpt["model"]["target.momentum_now"].item() == pytest.approx(0.99 + 0.009 * (updates - 1) / updates)
    assert 0.99 < m["final_ema_momentum"] < 0.999


def test_ijepa_digits_run_learns_without_collapse(tmp_path):
    m = short_run(tmp_path, "jepa", *JEPA, "model.patch_size=1")
    assert m["final_loss"] < 0.8 * m["first_loss"], m["loss_history"]
    assert m["final_target_std"] > STD_FLOOR
    # the student encoder is what a probe loads; its weights moved away from the teacher's
    encoder, spec, ckpt = load_encoder(tmp_path / "jepa" / "checkpoints" / "last.pt")
    assert spec.method == "ijepa" and encoder.grid == 8
    teacher, _, _ = load_encoder(tmp_path / "jepa" / "checkpoints" / "last.pt", ckpt=ckpt, weights="ema")
    sd, td = encoder.state_dict(), teacher.state_dict()
    assert sd.keys() == td.keys() and not torch.equal(sd["blocks.0.mlp.fc1.weight"], td["blocks.0.mlp.fc1.weight"])
    # `mimkit probe` takes either; their features are cached apart
    for which in ("student", "ema"):
        assert main(["probe", "knn", "--checkpoint", str(tmp_path / "jepa" / "checkpoints" / "last.pt"),
                     "data.limit=128", f"encoder={which}", f"output_dir={tmp_path / which}"]) == 0
    knn = [json.loads((tmp_path / w / "metrics.json").read_text()) for w in ("student", "ema")]
    # different weights, different features: equal accuracies at every k would mean the cache mixed them up
    assert knn[0]["pretrained"] != knn[1]["pretrained"]


def test_kill9_then_resume_with_the_ema_teacher_is_bitwise_exact(tmp_path):
    """data2vec2 (the teacher, its momentum, the clones and the decoder's noise) killed with SIGKILL in the middle of
    its second checkpoint write, then resumed: the same weights, teacher included, as an uninterrupted run."""
    import signal

    from test_faults import DRIVER, run
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    args = ["epochs=2", "data.synthetic_size=32", "batch_size=16", "probe.enabled=false", *D2V]
    ref, out = tmp_path / "ref", tmp_path / "killed"
    assert run(driver, ref, extra_args=args) == 0
    assert run(driver, out, {"KILL_AT_CKPT_WRITE": "2"}, extra_args=args) == -signal.SIGKILL
    assert load(out / "checkpoints" / "last.pt")["epoch"] == 0  # the first epoch's checkpoint survived
    assert run(driver, out, extra_args=args) == 0
    a, b = (load(d / "checkpoints" / "last.pt") for d in (ref, out))
    assert any(k.startswith("target.teacher.") for k in a["model"]) and a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]


@pytest.mark.parametrize("path", sorted(p.name for p in (REPO / "configs" / "pretrain").glob("*.yaml")
                                        if p.name.startswith(("data2vec2", "ijepa"))))
def test_shipped_configs_build(path):
    cfg = pretrain_config([str(REPO / "configs" / "pretrain" / path)], ["data.root=/x"])
    assert cfg.method == path.split("_")[0]
    validate(cfg)
    grid = cfg.data.img_size // cfg.model.patch_size
    m = build_mask_generator(cfg.mask, grid, cfg.model.patch_size)(torch.Generator().manual_seed(0))
    assert m.shape[-1] == grid * grid and 0 < m.float().mean() < 1
    if "digits" in path or "cifar10" in path:
        build_method(cfg)  # the heads, the teacher and the target settings fit the encoder


DDP_WORKER = """
import sys
import torch
from mimkit import dist, engine
from mimkit.methods import pretrain_config

base, common = sys.argv[1], sys.argv[2:]
dist.cleanup = lambda: None  # one process group for both runs
engine.train(pretrain_config([], [*common, f"output_dir={base}/d2v", *{d2v}, "data2vec2.cls_loss=0.02"]))
engine.train(pretrain_config([], [*common, f"output_dir={base}/jepa", *{jepa}, "epochs=1"]))
# I-JEPA trims each rank's blocks to its own batch (as the official collator), so it is not equal to one process;
# what must hold is one teacher on every rank
model = engine.build_method(pretrain_config([], [*common, f"output_dir={base}/jepa", *{jepa}]))
model.load_state_dict(torch.load(f"{base}/jepa/checkpoints/last.pt", weights_only=True)["model"])
teacher = torch.cat([p.flatten() for p in model.target.teacher.parameters()])
gathered = dist.all_gather_object(teacher)
assert torch.equal(gathered[0], gathered[1])
torch.distributed.destroy_process_group()
# everything is checked above; skip the interpreter's teardown, where gloo's threads once aborted rank 0
# ("terminate called without an active exception") after a run that had finished and written its results
sys.stdout.flush()
import os
os._exit(0)
"""


def test_two_processes_match_one_process_with_the_ema_teacher(tmp_path):
    import os
    import subprocess
    import sys

    from test_ddp import free_port
    # 160 synthetic images, 2 epochs of 10 steps; no decoder noise (each rank draws its own); fairseq's CLS term
    # is summed over a process's samples, so one process with twice the batch takes half the weight
    common = ["data.name=synthetic", "data.synthetic_size=160", "optim.blr=1e-2", "epochs=2", "probe.enabled=false",
              "conv_decoder.noise_std=0"]
    (tmp_path / "worker.py").write_text(DDP_WORKER.replace("{d2v}", repr(D2V)).replace("{jepa}", repr(JEPA)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(tmp_path / "worker.py"), str(tmp_path), *common, "batch_size=8"]
    proc = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(pretrain_config([], [*common, *D2V, "batch_size=16", "data2vec2.cls_loss=0.01",
                                   f"output_dir={tmp_path / 'single'}"]))
    finally:
        torch.set_num_threads(n)
    a, b = (load(tmp_path / d / "checkpoints" / "last.pt") for d in ("single", "d2v"))
    assert a["step"] == b["step"] == 20
    init = build_method(pretrain_config([], [*common, *D2V, f"output_dir={tmp_path / 'x'}"])).state_dict()
    moved = max((a["model"][k].float() - init[k].float()).abs().max().item() for k in a["model"])
    assert moved > 1e-3, moved
    for k in a["model"]:
        x, y = a["model"][k], b["model"][k]
        if k.endswith("qkv.bias"):  # the key bias: rounding noise only (see test_ddp.py)
            x, y = x.view(3, -1)[[0, 2]], y.view(3, -1)[[0, 2]]
        torch.testing.assert_close(y, x, rtol=0, atol=1e-5, msg=k)
