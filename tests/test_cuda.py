"""The CUDA path, against the CPU or fp32 reference: bf16 autocast, fused AdamW resume, NCCL DDP, the HOG's tensor
path, k-NN, FAISS GPU k-means. Marked `cuda` and skipped without a CUDA device; `bash benchmarks/gpu_check.sh`
runs them (`pytest -m cuda`) on a GPU machine."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from conftest import die_after_first_checkpoint, make_cfg

DEVICE = "cuda"
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture
def deterministic():
    """cuBLAS and the index kernels in their deterministic modes (a bitwise comparison of two GPU runs needs
    them; the workspace setting must precede cuBLAS's first use in the process, hence also set at import)."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(False)


os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def mae_and_batch(tmp_path, *overrides: str):
    """A small ViT MAE on the device (fp32 weights) and a fixed batch of images and masks."""
    from mimkit.masking import build_mask_generator
    from mimkit.methods import build_method
    cfg = make_cfg(tmp_path, "data.img_size=32", "model.embed_dim=128", "model.depth=4", "decoder.embed_dim=128",
                   *overrides)
    torch.manual_seed(0)
    model = build_method(cfg).to(DEVICE)
    gen = build_mask_generator(cfg.mask, cfg.data.img_size // cfg.model.patch_size, cfg.model.patch_size)
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(16, 3, 32, 32, generator=g).to(DEVICE)
    mask = torch.stack([gen(g) for _ in range(16)]).to(DEVICE)
    return cfg, model, imgs, mask


def test_bf16_autocast_loss_is_close_to_fp32(tmp_path):
    from mimkit.dist import autocast
    _, model, imgs, mask = mae_and_batch(tmp_path)
    dev = torch.device(DEVICE)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, False  # true fp32
    try:
        with torch.no_grad():
            with autocast(dev, "fp32"):
                fp32 = model(imgs, mask)["loss"].item()
            with autocast(dev, "bf16"):
                bf16 = model(imgs, mask)["loss"]
            cpu = model.cpu()(imgs.cpu(), mask.cpu())["loss"].item()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    assert bf16.dtype == torch.float32  # the losses stay in fp32 under autocast
    assert fp32 == pytest.approx(cpu, rel=1e-4)  # the device's fp32 is the CPU's, up to summation order
    # bf16 keeps 8 bits of mantissa: ~0.4% per rounding, averaged over thousands of terms
    assert bf16.item() == pytest.approx(fp32, rel=2e-2) and bf16.item() != fp32


def test_fused_adamw_resume_is_bitwise_exact_on_gpu(tmp_path, monkeypatch, deterministic):
    from mimkit.checkpoint import load
    from mimkit.engine import train
    from mimkit.loop import build_optimizer
    from torch.nn.attention import SDPBackend, sdpa_kernel
    common = (f"device={DEVICE}", "epochs=3", "model.drop_path=0.1")
    cfg = make_cfg(tmp_path, *common)
    assert build_optimizer(torch.nn.Linear(2, 2).to(DEVICE), cfg, torch.device(DEVICE)).defaults["fused"]
    # the flash and memory-efficient attention backwards add with atomics (no deterministic mode): the math
    # kernel keeps two runs comparable bit for bit; the optimizer, its state and the RNG are what is tested
    with sdpa_kernel(SDPBackend.MATH):
        full = train(make_cfg(tmp_path, *common, f"output_dir={tmp_path / 'a'}"))
        again = train(make_cfg(tmp_path, *common, f"output_dir={tmp_path / 'a2'}"))
        die_after_first_checkpoint(monkeypatch)
        with pytest.raises(KeyboardInterrupt):
            train(make_cfg(tmp_path, *common, f"output_dir={tmp_path / 'b'}"))
        monkeypatch.undo()
        resumed = train(make_cfg(tmp_path, *common, f"output_dir={tmp_path / 'b'}"))
    a, a2, b = (load(tmp_path / d / "checkpoints" / "last.pt")["model"] for d in ("a", "a2", "b"))
    # two uninterrupted runs first: if they differ, the GPU run is not deterministic and resume cannot be exact
    assert all(torch.equal(a[k], a2[k]) for k in a), "two identical GPU runs differ: nondeterministic kernels"
    assert full["loss_history"] == again["loss_history"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert full["loss_history"] == resumed["loss_history"]


WORKER = textwrap.dedent("""
    import sys
    import torch
    import torch.distributed as td
    from torch.nn.parallel import DistributedDataParallel
    from mimkit import dist
    from mimkit.masking import build_mask_generator
    from mimkit.methods import build_method, pretrain_config

    cfg = pretrain_config([], ["data.name=synthetic", "device=cuda", f"output_dir={sys.argv[1]}"])
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    td.init_process_group("nccl", device_id=device)
    assert dist.world_size() == 1 and td.get_backend() == "nccl"
    torch.manual_seed(0)
    model = build_method(cfg).to(device)
    plain = build_method(cfg).to(device)
    plain.load_state_dict(model.state_dict())
    ddp = DistributedDataParallel(model, device_ids=[0], find_unused_parameters=True)
    gen = build_mask_generator(cfg.mask, cfg.data.img_size // cfg.model.patch_size, cfg.model.patch_size)
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(8, 3, cfg.data.img_size, cfg.data.img_size, generator=g).to(device)
    mask = torch.stack([gen(g) for _ in range(8)]).to(device)
    ddp(imgs, mask)["loss"].backward()
    plain(imgs, mask)["loss"].backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
    t = torch.ones(3, device=device)
    td.all_reduce(t)
    assert t.tolist() == [1.0, 1.0, 1.0]
    td.destroy_process_group()
    print("nccl ok")
""")


def test_nccl_ddp_one_process_smoke(tmp_path):
    """torchrun, one process, the NCCL backend: DDP's gradients equal the plain model's (one rank: the all-reduce
    averages one copy), an all-reduce returns its input."""
    from test_ddp import free_port
    (tmp_path / "worker.py").write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(tmp_path / "worker.py"), str(tmp_path / "run")]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "nccl ok" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]


def test_hog_tensor_path_on_gpu_equals_cpu_kernel():
    from mimkit.hog import HOG
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(4, 3, 64, 64, generator=g, dtype=torch.float64)
    for hog in (HOG(cell=8), HOG(cell=4, window=16), HOG(cell=8, gradient="central")):
        cpu = hog(imgs)  # the numba kernel
        gpu = hog.to(DEVICE)(imgs.to(DEVICE)).cpu()
        torch.testing.assert_close(gpu, cpu, rtol=0, atol=1e-10)  # float64: only summation order differs
    x32 = imgs.float()
    cpu, gpu = HOG()(x32), HOG().to(DEVICE)(x32.to(DEVICE)).cpu()
    off = (gpu - cpu).abs() > 1e-4  # float32: a rare pixel on a bin edge lands in the neighbouring bin
    assert off.float().mean() < 1e-3 and (gpu - cpu).abs().mean() < 1e-5


def test_knn_on_gpu_equals_cpu():
    from mimkit.probes.knn import knn_scores, search
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(2000, 64, generator=g), torch.randn(300, 64, generator=g)
    labels = torch.randint(0, 10, (2000,), generator=g)
    train_n, test_n = torch.nn.functional.normalize(train, dim=1), torch.nn.functional.normalize(test, dim=1)
    s_cpu, i_cpu = search(train_n, test_n, 20, backend="torch")
    s_gpu, i_gpu = search(train_n.to(DEVICE), test_n.to(DEVICE), 20, backend="torch")
    assert torch.equal(i_gpu, i_cpu)  # random features: no ties within 1e-6
    torch.testing.assert_close(s_gpu, s_cpu, rtol=0, atol=1e-5)
    cpu = knn_scores(train, labels, test, ks=(10, 20), backend="torch")
    gpu = knn_scores(train.to(DEVICE), labels.to(DEVICE), test.to(DEVICE), ks=(10, 20), backend="torch")
    for k in (10, 20):
        assert torch.equal(gpu[k].argmax(1), cpu[k].argmax(1))
        torch.testing.assert_close(gpu[k], cpu[k], rtol=1e-4, atol=1e-4)


def test_faiss_gpu_kmeans_matches_cpu():
    faiss = pytest.importorskip("faiss")
    from mimkit.tokenizers.kmeans import faiss_gpus, fit_kmeans
    if faiss_gpus() == 0:
        pytest.skip(f"faiss {getattr(faiss, '__version__', '')} has no GPU support (faiss-gpu not installed)")
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 10, (16, 32)).astype(np.float32)  # well separated: every point's cluster is clear
    x = (centers[rng.integers(0, 16, 20000)] + rng.normal(0, 0.5, (20000, 32))).astype(np.float32)
    init = x[:16] + 0  # the same start for both
    cpu = fit_kmeans(x, 16, niter=20, init=init, gpu=False)
    gpu = fit_kmeans(x, 16, niter=20, init=init, gpu=True)
    np.testing.assert_allclose(gpu, cpu, rtol=0, atol=1e-3)
