"""`mimkit --help` and every command's help build and print without importing torch (the command functions
import what they run; the registries' names in the help come from a cache file), with the registries' names."""
import dataclasses
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


# Runs `mimkit ARGV` for each command line in argv[1] (JSON) and reports the exit codes, stderr and torch's presence.
RUN_EVERY_LINE = r"""
import contextlib, io, json, sys
from mimkit.cli import main

runs = {}
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    runs[" ".join(argv)] = [code, err.getvalue()]
print(json.dumps({"torch": "torch" in sys.modules, "runs": runs}))
"""

# A mistake in a key, a type, a choice or a range of each command that builds its config before it runs, and a
# word its one error line names.
CONFIG_MISTAKES = {
    "pretrain optim.bllr=1": "optim.blr",
    "pretrain epochs=many": "epochs must be an integer",
    "pretrain method=maee": "did you mean mae",
    "pretrain data.name=digits target.kind=pixel": "did you mean pixels",
    "pretrain epochs=0": "epochs=0 is out of range",
    "pretrain decoder.embed_dim=100 decoder.num_heads=16": "decoder.embed_dim=100 is not divisible",
    "pretrain target.pixels.norm=true": "target.pixels.norm_pix",
    "probe knn --checkpoint runs/x/checkpoints/last.pt knn.kk=5": "knn.k",
    "probe linear --checkpoint runs/x/checkpoints/last.pt data.name=digit": "did you mean digits",
    "tokenizer train kind=dvae vocab_sise=1": "vocab_size",
    "tokenizer train kind=dvea": "did you mean dvae",
    "tokenizer train kind=vqkd vqkd.code_dim=wide": "vqkd.code_dim must be an integer",
    "tokenizer train kind=fsq fsq.objective=pixel": "did you mean pixels",
    "tokenizer train kind=kmeans batch_size=0": "batch_size=0 is out of range",
    "analyze tokens --tokenizer tok.pt figures.gallery_tokenz=3": "figures.gallery_tokens",
    "analyze tokens --tokenizer tok.pt split=val": "train, test",
    "analyze tokens --tokenizer tok.pt batch_size=0": "batch_size=0 is out of range",
    "analyze predictions --checkpoint run.pt data.name=digit": "did you mean digits",
    "analyze predictions --checkpoint run.pt figures.context=-1": "figures.context=-1 is out of range",
    "analyze predictions --checkpoint run.pt data.name=cifar10 data.limit=-5": "data.limit=-5 is out of range",
    "study --config study.yaml budget.epochs=1 cells.a.overrides=[optim.bllr=1]": "optim.blr",
    "study --config study.yaml tokenizers.t.kind=dvea": "did you mean dvae",
    "study --config study.yaml tokenizers.t.kind=dvae tokenizers.t.overrides=[dvae.tau=1]": "dvae.tau_start",
}
# the study every `study` line above starts from (a file in the working directory)
STUDY = "output_dir: runs/study\ndata: {name: synthetic}\ncells: {a: {method: mae}}\n"


def test_config_errors_print_without_torch(tmp_path):
    """A mistake in a key, a type, a choice, a kind or a range of pretrain, probe, tokenizer train, analyze and
    study is one error line, exit status 2, and torch is never imported."""
    (tmp_path / "study.yaml").write_text(STUDY)
    lines = [line.split() for line in CONFIG_MISTAKES]
    r = subprocess.run([sys.executable, "-c", RUN_EVERY_LINE, json.dumps(lines)], capture_output=True, text=True,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout)
    for line, word in CONFIG_MISTAKES.items():
        code, err = seen["runs"][line]
        assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and word in err, (line, err)
    assert not seen["torch"]


# The pretraining config's class, recipes and presets as plain data: what `mimkit pretrain` sees.
DESCRIBE_CONFIG = r"""
import dataclasses, json, sys
from mimkit.pretrain_config import config_class
from mimkit.parts import HEAD_SECTIONS, LOSS_NAMES, METHOD_SECTIONS, RECIPES, TARGET_SECTIONS
from mimkit.sections import DATA_PRESETS, DATASETS, MASK_KINDS

def tree(cls):
    return [[f.name, str(f.type), f.default if f.default is not dataclasses.MISSING else None,
             list(f.metadata.get("choices", ())),
             tree(f.default_factory) if dataclasses.is_dataclass(f.default_factory) else None]
            for f in dataclasses.fields(cls)]

if len(sys.argv) > 1:
    import mimkit.methods  # the registries, filled by the parts' modules
print(json.dumps({"torch": "torch" in sys.modules, "config": tree(config_class()), "recipes": RECIPES,
                  "presets": DATA_PRESETS, "heads": list(HEAD_SECTIONS), "targets": list(TARGET_SECTIONS),
                  "methods": list(METHOD_SECTIONS), "losses": LOSS_NAMES, "masks": MASK_KINDS,
                  "datasets": list(DATASETS)}, default=str))
"""


def test_config_tables_are_the_registries():
    """The config built without importing the parts (mimkit.parts, mimkit.sections) is the one built after the
    registries are filled: same sections, keys, defaults, choices and recipes; the tables list what is registered,
    in registration order."""
    light, full = (json.loads(subprocess.run([sys.executable, "-c", DESCRIBE_CONFIG, *extra], capture_output=True,
                                             text=True, check=True).stdout) for extra in ([], ["registries"]))
    assert not light.pop("torch") and full.pop("torch")
    assert light == full
    from mimkit.data import DATASETS
    from mimkit.heads import HEADS
    from mimkit.losses import LOSSES
    from mimkit.methods import METHODS
    from mimkit.targets import TARGETS
    assert full["heads"] == list(HEADS) and full["targets"] == list(TARGETS) and full["methods"] == list(METHODS)
    assert full["losses"] == list(LOSSES) and full["datasets"] == list(DATASETS)
    assert all(json.loads(json.dumps(cls.recipe)) == full["recipes"][name] for name, cls in METHODS.items())


# The tokenizer config's class and recipes as plain data: what `mimkit tokenizer train` checks before torch loads.
DESCRIBE_TOKENIZER_CONFIG = DESCRIBE_CONFIG.split("if len(sys.argv)")[0] + r"""
from mimkit.tokenizer_config import TOKENIZER_RECIPES, TOKENIZER_SECTIONS, config_class as tokenizer_class
if len(sys.argv) > 1:
    import mimkit.tokenizers  # the registry, filled by the kinds' modules
print(json.dumps({"torch": "torch" in sys.modules, "config": tree(tokenizer_class()), "recipes": TOKENIZER_RECIPES,
                  "kinds": list(TOKENIZER_SECTIONS)}, default=str))
"""


def test_tokenizer_config_tables_are_the_registry():
    """`mimkit tokenizer train`'s config built without the kinds' modules (mimkit.tokenizer_config) is the one built
    after they register: same sections, keys, defaults, choices and recipes, the kinds in registration order."""
    light, full = (json.loads(subprocess.run([sys.executable, "-c", DESCRIBE_TOKENIZER_CONFIG, *extra],
                                             capture_output=True, text=True, check=True).stdout)
                   for extra in ([], ["registry"]))
    assert not light.pop("torch") and full.pop("torch")
    assert light == full
    from mimkit.tokenizers import TOKENIZERS
    from mimkit.tokenizers.config import config_class
    assert full["kinds"] == list(TOKENIZERS)
    assert all(json.loads(json.dumps(cls.recipe)) == full["recipes"][kind] for kind, cls in TOKENIZERS.items())
    assert {f.name for f in dataclasses.fields(config_class())} >= set(TOKENIZERS) - {
        kind for kind, cls in TOKENIZERS.items() if cls.Config is None}
