import subprocess
import sys

import pytest

from mimkit.cli import main
from mimkit.config import ConfigError, diff, from_dict, to_dict
from mimkit.methods import config_class, pretrain_config, validate

from conftest import REPO


def test_defaults_are_the_digits_mae_job():
    cfg = pretrain_config([], [])
    assert (cfg.method, cfg.data.name, cfg.data.img_size, cfg.model.patch_size) == ("mae", "digits", 8, 2)
    assert cfg.target.pixels.norm_pix is False  # near-constant 8x8 patches: raw pixels (see DATA_PRESETS)
    assert cfg.mask.ratio == 0.5 and cfg.optim.betas == (0.9, 0.95)  # 4x4 grid: see DATA_PRESETS
    assert pretrain_config([], ["data.name=cifar10"]).mask.ratio == 0.75  # MAE's recipe elsewhere


def test_layers_recipe_then_preset_then_file_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  blr: 0.002\nepochs: 7\ndata:\n  name: cifar10\n  root: /x\n")
    cfg = pretrain_config([str(f)], ["epochs=9", "optim.betas=[0.9,0.99]", "data.crop_scale=0.5,1"])
    assert cfg.optim.blr == 0.002 and cfg.epochs == 9 and cfg.optim.betas == (0.9, 0.99)
    assert cfg.data.crop_scale == (0.5, 1.0)
    assert cfg.data.img_size == 32 and cfg.model.arch == "vit_tiny"  # cifar10 preset chosen from the file


def test_imagefolder_gets_the_official_vit_b16_recipe():
    cfg = pretrain_config([], ["data.name=imagefolder", "data.root=/x"])
    assert (cfg.data.img_size, cfg.model.patch_size, cfg.model.resolved()["embed_dim"]) == (224, 16, 768)
    assert (cfg.decoder.depth, cfg.decoder.embed_dim, cfg.target.pixels.norm_pix) == (8, 512, True)


@pytest.mark.parametrize("override, words", [
    (["optim.bllr=1"], ["optim.bllr", "optim.blr"]),
    (["mthod=mae"], ["mthod", "method"]),
    (["method=mea"], ["method", "mae"]),
    (["data.name=cifar"], ["data.name", "cifar10"]),
    (["epochs=ten"], ["epochs", "integer"]),
    (["optim.blr=abc"], ["optim.blr", "number"]),
    (["data.hflip=maybe"], ["data.hflip", "true or false"]),
    (["optim.betas=[0.9]"], ["optim.betas", "2"]),
    (["optim=3"], ["optim", "section"]),
    (["novalue"], ["key=value"]),
])
def test_bad_overrides_name_the_key(override, words):
    with pytest.raises(ConfigError) as e:
        pretrain_config([], override)
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("override, words", [
    (["mask.ratio=1.0"], ["mask.ratio"]),
    (["batch_size=0"], ["batch_size"]),
    (["optim.blr=0"], ["optim.blr"]),
    (["data.img_size=9"], ["img_size", "patch_size"]),
    (["data.name=cifar10", "data.root="], ["data.root"]),
    (["resume=/no/such.pt"], ["resume"]),
])
def test_validate_ranges(override, words):
    cfg = pretrain_config([], override)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    for w in words:
        assert w in str(e.value)


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  blr: [1, 2\n")
    with pytest.raises(ConfigError, match="YAML syntax error.*line"):
        pretrain_config([str(bad)], [])
    with pytest.raises(ConfigError, match="not found"):
        pretrain_config([str(tmp_path / "missing.yaml")], [])


def test_round_trip_and_diff():
    cfg = pretrain_config([], ["optim.blr=0.01"])
    again = from_dict(config_class(), to_dict(cfg))
    assert diff(cfg, again) == []
    again.optim.blr = 0.02
    assert diff(cfg, again) == ["optim.blr"]


@pytest.mark.parametrize("old, new", [("target.norm_pix=true", "target.pixels.norm_pix"),
                                      ("model.decoder_depth=2", "decoder.depth"),
                                      ("target.tokenizer=x.pt", "target.tokens.tokenizer"),
                                      ("model.aux_layer=3", "beitv2.aux_layer")])
def test_renamed_keys_name_their_new_key(old, new):
    with pytest.raises(ConfigError, match=f"did you mean {new}"):
        pretrain_config([], [old])


def test_a_config_stored_under_old_key_names_still_reads():
    cfg = pretrain_config([], ["method=clustermim", "target.tokens.tokenizer=t.pt", "decoder.depth=3"])
    old = to_dict(cfg)
    old["target"] = {"kind": "tokens", "tokenizer": "t.pt", "norm_pix": False}  # how 0.1 sessions stored it
    old["model"]["decoder_depth"] = old.pop("decoder")["depth"]
    again = from_dict(config_class(), old)
    assert again.target.tokens.tokenizer == "t.pt" and again.decoder.depth == 3


def test_each_value_is_set_in_one_layer():
    """The MAE recipe names its parts; its values are the dataclass defaults (not restated), and the digits
    preset, not the shipped YAML, sets the 4x4 grid's mask ratio."""
    from mimkit.methods import MAE
    assert "mask.ratio" not in MAE.recipe and "optim.blr" not in MAE.recipe
    assert {"head", "target.kind", "loss", "mask.kind"} <= set(MAE.recipe)
    assert pretrain_config([str(REPO / "configs/pretrain/mae_digits.yaml")], []) == pretrain_config([], [])
    assert "mask" not in (REPO / "configs/pretrain/mae_digits.yaml").read_text()


def test_cli_error_is_one_line_exit_2(capsys):
    assert main(["pretrain", "optim.bllr=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "optim.blr" in err[0]


def test_run_pretrain_script_bad_key_subprocess(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "run_pretrain.py"), "data.nme=digits"], capture_output=True,
                       text=True, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "data.name" in r.stderr
    assert "Traceback" not in r.stderr


def test_help_lists_methods_datasets_presets(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    out = capsys.readouterr().out
    assert "methods: mae" in out and "digits" in out and "configs/pretrain/" in out
