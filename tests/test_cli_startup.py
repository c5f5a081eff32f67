"""`mimkit --help` and every command's help build and print without importing torch (the command functions
import what they run; the registries' names in the help come from a cache file), with the registries' names."""
import json
import os
import subprocess
import sys

from mimkit import commands

# Walks every command and sub-command of the parser, prints each one's help, and reports what it saw.
HELP_EVERY_COMMAND = r"""
import argparse, contextlib, io, json, sys
from mimkit.cli import build_parser, main

def commands(parser, prefix):
    yield prefix
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, prefix + [name])

helps = {}
for argv in commands(build_parser(), []):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main(argv + ["--help"])
        except SystemExit as e:
            assert e.code == 0, argv
    helps[" ".join(argv)] = out.getvalue()
print(json.dumps({"torch": "torch" in sys.modules, "helps": helps}))
"""


def test_every_help_prints_without_torch(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    names = commands.collect_registry_names()
    cache = tmp_path / "mimkit" / f"registries-{commands.source_key()}.json"
    cache.parent.mkdir()
    cache.write_text(json.dumps(names))  # what the first help in a fresh process writes
    r = subprocess.run([sys.executable, "-c", HELP_EVERY_COMMAND], capture_output=True, text=True,
                       env={**os.environ, "COLUMNS": "120"}, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout)
    assert not seen["torch"]
    helps = seen["helps"]
    expected = {"", "pretrain", "probe", "probe linear", "probe knn", "probe finetune", "export", "tokenizer",
                "tokenizer train", "tokenizer info", "submit", "analyze", "analyze tokens", "analyze predictions",
                "study"}
    assert expected <= set(helps) and all(helps.values())
    kinds = ", ".join(kind for kind, _ in names["tokenizers"])
    assert f"train or inspect tokenizers ({kinds})" in " ".join(helps[""].split())
    assert "methods: " + ", ".join(names["methods"]) in helps["pretrain"]
    assert f"target.kind ({', '.join(names['targets'])})" in helps["pretrain"]
    assert "kinds: kmeans (" in helps["tokenizer train"]


def test_registry_names_cache(tmp_path, monkeypatch):
    """Written on first use under $XDG_CACHE_HOME, read back by the next process, rewritten when unreadable;
    without a writable cache the names are still right."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    live, calls = commands.collect_registry_names(), []
    monkeypatch.setattr(commands, "collect_registry_names", lambda: calls.append(1) or live)
    fresh = {k: v for k, v in sys.modules.items() if not k.startswith(("mimkit.methods", "mimkit.targets",
                                                                           "mimkit.tokenizers"))}
    monkeypatch.setattr(sys, "modules", fresh)  # what registry_names sees in a process without the registries
    assert commands.registry_names() == live and len(calls) == 1
    path = tmp_path / "mimkit" / f"registries-{commands.source_key()}.json"
    assert json.loads(path.read_text()) == live
    assert commands.registry_names() == live and len(calls) == 1  # from the file
    path.write_text("{not json")
    assert commands.registry_names() == live and len(calls) == 2
    assert json.loads(path.read_text()) == live
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))  # cannot hold a folder
    assert commands.registry_names() == live and len(calls) == 3


def test_registry_names_live_once_imported(monkeypatch):
    """A program that imported the registries (and maybe registered its own parts) sees them listed live."""
    import mimkit.methods  # noqa: F401
    monkeypatch.setenv("XDG_CACHE_HOME", "/nonexistent")
    monkeypatch.setattr(commands, "collect_registry_names", lambda: {"live": True})
    assert commands.registry_names() == {"live": True}
