"""Console output: a progress bar only where stdout and stderr are terminals, plain progress lines otherwise,
nothing with --quiet (log.txt keeps the log lines); and the one warning for bf16 on a CPU that emulates it."""
import functools
import sys
from types import SimpleNamespace

import pytest
import torch
from tqdm import tqdm

from mimkit import dist, progress
from mimkit.cli import main
from mimkit.loop import Loop, RunLog, train_one_epoch


def set_terminal(monkeypatch, stdout: bool, stderr: bool) -> None:
    monkeypatch.setattr(sys.stdout, "isatty", lambda: stdout)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: stderr)


@pytest.mark.parametrize("stdout,stderr", [(True, True), (False, True), (True, False), (False, False)])
def test_bar_only_when_both_streams_are_terminals(monkeypatch, stdout, stderr):
    set_terminal(monkeypatch, stdout, stderr)
    shown = progress.bar(range(3), "x")
    assert isinstance(shown, tqdm) == (stdout and stderr)
    assert isinstance(shown, progress.Lines) == (not (stdout and stderr))
    assert not getattr(shown, "disable", False)  # (tqdm sets it when closed)
    assert list(shown) == [0, 1, 2]
    hidden = progress.bar(range(3), "x", enabled=False)  # ranks other than 0
    assert isinstance(hidden, tqdm) and hidden.disable and list(hidden) == [0, 1, 2]
    with progress.quiet():
        quiet = progress.bar(range(3), "x")
        assert isinstance(quiet, tqdm) and quiet.disable and list(quiet) == [0, 1, 2]


def test_lines_every_interval(monkeypatch, capsys):
    clock = iter([0.0, 10.0, 70.0, 100.0, 131.0])  # start, then after each item
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    lines = progress.Lines([1, 2, 3, 4], "epoch 2/5")
    for i in lines:
        lines.set_postfix(loss=f"{i / 10:.4f}")
    assert capsys.readouterr().out.splitlines() == ["epoch 2/5: 2/4 loss=0.2000 (70 s)",  # 70 s since the start
                                                    "epoch 2/5: 4/4 loss=0.4000 (131 s)"]  # 61 s since the last line
    unsized = progress.Lines(iter([1]), "sampling")
    assert unsized.line(1, 5.0) == "sampling: 1 (5 s)"


def tiny_loop(tmp_path):
    optim = SimpleNamespace(blr=1e-3, lr_batch_ref=256, warmup_epochs=0.0, min_lr=0.0, clip_grad=0.0)
    cfg = SimpleNamespace(epochs=1, batch_size=2, accum_iter=1, precision="fp32", optim=optim)
    model = torch.nn.Linear(2, 1)
    return Loop(cfg, model, torch.optim.SGD(model.parameters(), lr=0.1), torch.device("cpu"), 3,
                log=RunLog(tmp_path)), model


def test_train_one_epoch_writes_plain_lines_off_a_terminal(tmp_path, monkeypatch, capsys):
    set_terminal(monkeypatch, False, False)
    monkeypatch.setattr(progress, "INTERVAL_S", 0.0)  # a line after every step
    loop, model = tiny_loop(tmp_path)
    batches = [(torch.ones(2, 2),)] * 3
    train_one_epoch(loop, batches, 0, lambda b: {"loss": model(b[0]).square().mean()})
    captured = capsys.readouterr()
    out = captured.out.splitlines()
    assert [line.split(" loss=")[0] for line in out] == [f"epoch 1/1: {i}/3" for i in (1, 2, 3)]
    assert all(" lr=" in line for line in out) and "\r" not in captured.err + captured.out


def test_quiet_silences_log_lines_but_not_log_txt(tmp_path, capsys):
    log = RunLog(tmp_path)
    with progress.quiet():
        log("epoch 1: loss 0.5")
    log("epoch 2: loss 0.4")
    assert capsys.readouterr().out == "epoch 2: loss 0.4\n"
    assert (tmp_path / "log.txt").read_text() == "epoch 1: loss 0.5\nepoch 2: loss 0.4\n"


def test_quiet_flag_anywhere_on_the_command_line(monkeypatch):
    seen = []
    monkeypatch.setattr("mimkit.cli.cmd_pretrain", lambda args: seen.append(progress._quiet))
    main(["pretrain", "--quiet", "epochs=1"])
    main(["pretrain", "epochs=1"])
    assert seen == [True, False] and not progress._quiet


CPUINFO = "processor\t: {i}\nvendor_id\t: X\nflags\t\t: fpu sse2 avx2 fma {extra}\n\n"


@pytest.mark.parametrize("extra,native", [("", False), ("avx512f avx512_bf16", True), ("amx_bf16 amx_tile", True)])
def test_bf16_on_a_cpu_without_native_bf16_warns_once(tmp_path, monkeypatch, capsys, extra, native):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("".join(CPUINFO.format(i=i, extra=extra) for i in range(2)))
    assert dist.native_bf16_cpu(str(cpuinfo)) is native
    monkeypatch.setattr(dist, "native_bf16_cpu", functools.partial(dist.native_bf16_cpu, str(cpuinfo)))
    dist.warn_slow_bf16.cache_clear()
    cpu = torch.device("cpu")
    assert not dist.uses_bf16(cpu, "fp32") and not dist.uses_bf16(cpu, "auto")
    assert capsys.readouterr().err == ""
    for _ in range(3):
        with dist.autocast(cpu, "bf16"):
            assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    err = capsys.readouterr().err.splitlines()
    assert err == ([] if native else [err[0]])
    assert native or (err[0].startswith("warning: precision=bf16") and "slower than fp32" in err[0])
    dist.warn_slow_bf16.cache_clear()


def test_unreadable_cpuinfo_is_no_evidence(tmp_path):
    assert dist.native_bf16_cpu(str(tmp_path / "missing"))
    (tmp_path / "arm").write_text("processor\t: 0\nFeatures\t: fp asimd\n")  # no x86 flags line
    assert dist.native_bf16_cpu(str(tmp_path / "arm"))
