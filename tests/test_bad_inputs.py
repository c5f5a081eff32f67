"""Every user mistake: exit status 2, one line `error: ...` naming the culprit, no traceback, and existing
files left untouched. Table-driven; each case builds what it needs under a tmp dir."""
import hashlib
from pathlib import Path

import pytest
import torch

from mimkit.cli import main

from test_data import make_tree


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Workspace: a finished tiny run, a data tree, and assorted bad files."""
    root = tmp_path_factory.mktemp("ws")
    assert main(["pretrain", "data.name=synthetic", "epochs=1", f"output_dir={root / 'run'}"]) == 0
    make_tree(root / "tree")
    (root / "empty_root").mkdir()
    make_tree(root / "noimg")
    (root / "noimg" / "train" / "zzz").mkdir()
    (root / "notes.txt").write_text("not a checkpoint")
    torch.save({"model": {}}, root / "foreign.pt")
    (root / "list.yaml").write_text("- a\n- b\n")
    (root / "broken.yaml").write_text("optim: {blr: 1\n")
    (root / "unknown.yaml").write_text("optim:\n  lr: 0.1\n")
    (root / "afile").write_text("x")
    (root / "tagged.yaml").write_text("optim: !!python/object/apply:os.system ['touch pwned']\n")
    (root / "cifar_neither" / "other").mkdir(parents=True)
    (root / "cifar_bad" / "cifar-10-batches-py").mkdir(parents=True)
    (root / "cifar_bad" / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"\x80\x02}q")  # truncated pickle
    # a k-means tokenizer for 16 px images with 4 px patches (grid 4x4), 8 codes
    from mimkit.tokenizers.kmeans import KMeansTokenizer
    tok = KMeansTokenizer(16, 4, 8, [0.5] * 3, [0.25] * 3, dim=48)
    tok.centroids.copy_(torch.randn(8, 48, generator=torch.Generator().manual_seed(0)))
    tok.save(root / "tok.pt")
    torch.save({"model": {}}, root / "teacher.pth")  # a "teacher" weights file with no weights in it
    study = f"output_dir: {root / 'study'}\ndata: {{name: synthetic}}\n"
    (root / "study_ok.yaml").write_text(study + "cells: {a: {method: mae}}\n")
    (root / "study_bad_ref.yaml").write_text(study + "cells: {a: {method: mae}, b: {method: beit, tokenizer: vq}}\n")
    (root / "study_bad_key.yaml").write_text(study + "cells: {a: {method: mae, overrides: [optim.bllr=1]}}\n")
    return root


SYN = ["data.name=synthetic"]
CASES = [
    # (id, argv after `mimkit`, words the one line must contain)
    ("unknown method", ["pretrain", "method=maee"], ["method", "mae"]),
    ("unknown dataset", ["pretrain", "data.name=imagenet"], ["data.name", "imagefolder"]),
    ("misspelled key", ["pretrain", "optim.bllr=1e-3"], ["optim.bllr", "optim.blr"]),
    ("misspelled section", ["pretrain", "optm.blr=1e-3"], ["optm.blr", "optim"]),
    ("wrong type int", ["pretrain", "epochs=ten"], ["epochs", "integer"]),
    ("wrong type float", ["pretrain", "optim.blr=fast"], ["optim.blr", "number"]),
    ("wrong type bool", ["pretrain", "data.hflip=maybe"], ["data.hflip", "true or false"]),
    ("bad tuple", ["pretrain", "optim.betas=[0.9]"], ["optim.betas"]),
    ("bad choice", ["pretrain", "mask.kind=blocks"], ["mask.kind", "block"]),
    ("bad arch", ["pretrain", "model.arch=vit_huge"], ["model.arch", "vit_large"]),
    ("mask ratio 1.5", ["pretrain", *SYN, "mask.ratio=1.5"], ["mask.ratio"]),
    ("mask ratio 0", ["pretrain", *SYN, "mask.ratio=0"], ["mask.ratio"]),
    ("negative lr", ["pretrain", *SYN, "optim.blr=-1"], ["optim.blr"]),
    ("negative warmup start lr", ["pretrain", *SYN, "optim.warmup_start_lr=-1e-4"], ["optim.warmup_start_lr"]),
    ("wd schedule from 0", ["pretrain", *SYN, "optim.weight_decay=0", "optim.weight_decay_end=0.4"],
     ["optim.weight_decay_end", "optim.weight_decay"]),
    ("batch size 0", ["pretrain", *SYN, "batch_size=0"], ["batch_size"]),
    ("accum 0", ["pretrain", *SYN, "accum_iter=0"], ["accum_iter"]),
    ("crop scale reversed", ["pretrain", *SYN, "data.crop_scale=[0.8,0.2]"], ["data.crop_scale"]),
    ("img not divisible", ["pretrain", *SYN, "data.img_size=18"], ["img_size", "patch_size"]),
    ("heads not dividing", ["pretrain", *SYN, "model.embed_dim=100", "model.num_heads=3"], ["embed_dim", "num_heads"]),
    ("cifar10 without root", ["pretrain", "data.name=cifar10"], ["data.root"]),
    ("missing root", ["pretrain", "data.name=imagefolder", "data.root={ws}/nope"], ["nope"]),
    ("empty root", ["pretrain", "data.name=imagefolder", "data.root={ws}/empty_root"], ["train"]),
    ("class without images", ["pretrain", "data.name=imagefolder", "data.root={ws}/noimg", "output_dir={ws}/o1"],
     ["zzz"]),
    ("batch larger than data", ["pretrain", *SYN, "data.limit=10", "output_dir={ws}/o2"], ["batch_size"]),
    ("missing resume file", ["pretrain", *SYN, "resume={ws}/none.pt"], ["resume"]),
    ("resume from text file", ["pretrain", *SYN, "resume={ws}/notes.txt", "output_dir={ws}/o3"], ["notes.txt"]),
    ("resume from foreign torch file", ["pretrain", *SYN, "resume={ws}/foreign.pt", "output_dir={ws}/o4"],
     ["foreign.pt", "not a mimkit"]),
    ("checkpoint of another arch", ["pretrain", *SYN, "model.embed_dim=32", "resume={ws}/run/checkpoints/last.pt",
                                    "output_dir={ws}/o5"], ["last.pt", "architecture"]),
    ("missing config file", ["pretrain", "--config", "{ws}/nope.yaml"], ["nope.yaml"]),
    ("yaml syntax error", ["pretrain", "--config", "{ws}/broken.yaml"], ["broken.yaml", "line"]),
    ("yaml not a mapping", ["pretrain", "--config", "{ws}/list.yaml"], ["list.yaml", "mapping"]),
    ("unknown key in yaml", ["pretrain", "--config", "{ws}/unknown.yaml"], ["optim.lr", "unknown.yaml"]),
    ("override without =", ["pretrain", "epochs"], ["key=value"]),
    ("yaml with a python tag", ["pretrain", "--config", "{ws}/tagged.yaml"], ["tagged.yaml", "!!python/object/apply",
                                                                          "refused"]),
    ("line break in a key", ["pretrain", "opt\nim.blr=1"], ["opt\\nim.blr"]),
    ("non-finite number", ["pretrain", *SYN, "optim.blr=.inf"], ["optim.blr", "finite"]),
    ("negative read retries", ["pretrain", *SYN, "data.read_retries=-1"], ["data.read_retries"]),
    ("cifar10 root with neither layout", ["pretrain", "data.name=cifar10", "data.root={ws}/cifar_neither"],
     ["cifar-10-batches-py", "train/", "data.download=true"]),
    ("cifar10 batch unreadable", ["pretrain", "data.name=cifar10", "data.root={ws}/cifar_bad"], ["data_batch_1"]),
    ("unwritable output dir", ["pretrain", *SYN, "output_dir={ws}/afile/run"], ["output_dir", "afile"]),
    ("existing run, other config", ["pretrain", *SYN, "epochs=1", "optim.blr=0.5", "output_dir={ws}/run"],
     ["optim.blr", "overwrite=true"]),
    ("existing run, resume=none", ["pretrain", *SYN, "epochs=1", "resume=none", "output_dir={ws}/run"],
     ["resume=auto"]),
    ("cuda without a gpu", ["pretrain", *SYN, "device=cuda"], ["cuda"]),
    ("unknown command", ["pretrian"], ["pretrian"]),
    # discrete targets: the tokenizer must fit the method before anything trains
    ("tokenizer grid mismatch", ["pretrain", *SYN, "method=clustermim", "data.img_size=32",
                                 "target.tokens.tokenizer={ws}/tok.pt"], ["token grid"]),
    ("tokenizer vocabulary mismatch", ["pretrain", *SYN, "method=clustermim", "target.tokens.vocab_size=16",
                                       "target.tokens.tokenizer={ws}/tok.pt"], ["target.tokens.vocab_size"]),
    ("tokenizer missing", ["pretrain", *SYN, "method=clustermim"], ["target.tokens.tokenizer"]),
    # parts: the composition named in a recipe can be changed, and must fit together
    ("unknown target kind", ["pretrain", *SYN, "target.kind=pixel"], ["target.kind", "pixels", "hog", "tokens"]),
    ("unknown head", ["pretrain", *SYN, "head=mlp"], ["head", "decoder", "linear"]),
    ("float target with ce", ["pretrain", *SYN, "loss=ce"], ["loss=ce", "target.kind=pixels", "mse"]),
    ("ids target with mse", ["pretrain", *SYN, "method=clustermim", "loss=mse", "target.tokens.tokenizer={ws}/tok.pt"],
     ["loss=mse", "ce"]),
    ("old key name", ["pretrain", *SYN, "target.norm_pix=true"], ["target.norm_pix", "target.pixels.norm_pix"]),
    ("teacher target without a teacher", ["pretrain", *SYN, "target.kind=teacher"], ["target.teacher.name"]),
    ("tokenizer file missing", ["pretrain", *SYN, "method=clustermim", "target.tokens.tokenizer={ws}/none.pt"],
     ["none.pt"]),
    ("tokenizer is not a tokenizer", ["pretrain", *SYN, "method=beit", "target.tokens.tokenizer={ws}/run/checkpoints/last.pt"],
     ["last.pt", "tokenizer"]),
    # latent targets (EMA teacher) and their masks and heads
    ("ema top_k deeper than the encoder", ["pretrain", *SYN, "method=data2vec2"], ["target.ema.top_k=10", "2 blocks"]),
    ("ema momentum above 1",
     ["pretrain", *SYN, "method=data2vec2", "target.ema.top_k=2", "target.ema.momentum=1.5"],
     ["target.ema.momentum"]),
    ("ema unknown norm", ["pretrain", *SYN, "method=ijepa", "target.ema.norm=batch"], ["target.ema.norm", "layernorm"]),
    ("multiblock mask for mae", ["pretrain", *SYN, "mask.kind=multiblock", "mask.min_keep=0"],
     ["method=mae", "multiblock"]),
    ("ijepa without multiblock", ["pretrain", *SYN, "method=ijepa", "mask.kind=block"], ["method=ijepa", "multiblock"]),
    ("multiblock blocks too small", ["pretrain", *SYN, "method=ijepa"], ["mask.target_scale", "mask.min_keep=10"]),
    ("inverse block longer than the grid",
     ["pretrain", *SYN, "method=data2vec2", "target.ema.top_k=2", "mask.block_len=5"], ["mask.block_len=5"]),
    ("inverse block clones 0", ["pretrain", *SYN, "method=data2vec2", "target.ema.top_k=2", "mask.clones=0"],
     ["mask.clones"]),
    ("conv decoder groups", ["pretrain", *SYN, "method=data2vec2", "target.ema.top_k=2", "conv_decoder.groups=5"],
     ["conv_decoder.groups=5"]),
    ("predictor width and heads", ["pretrain", *SYN, "method=ijepa", "mask.min_keep=0", "predictor.embed_dim=30"],
     ["predictor.embed_dim=30"]),
    ("data2vec2 negative cls loss", ["pretrain", *SYN, "method=data2vec2", "target.ema.top_k=2",
                                     "data2vec2.cls_loss=-1"], ["data2vec2.cls_loss"]),
    # tokenizer training
    ("tokenizer unknown kind", ["tokenizer", "train", "kind=vqvae"], ["kind", "vqkd"]),
    ("tokenizer misspelled key", ["tokenizer", "train", "vocab_sise=64"], ["vocab_sise", "vocab_size"]),
    ("teacher name unknown", ["tokenizer", "train", "kind=vqkd", "data.name=digits", "teacher.name=dino:vit",
                              "output_dir={ws}/t1"], ["teacher.name"]),
    ("teacher without weights", ["tokenizer", "train", "kind=vqkd", "data.name=digits",
                                 "teacher.name=timm:vit_tiny_patch16_224", "output_dir={ws}/t2"], ["teacher.weights"]),
    ("teacher weights unloadable", ["tokenizer", "train", "kind=vqkd", "data.name=digits",
                                    "teacher.name=timm:vit_tiny_patch16_224", "teacher.weights={ws}/teacher.pth",
                                    "output_dir={ws}/t3"], ["teacher.pth"]),
    ("teacher checkpoint missing", ["tokenizer", "train", "kind=vqkd", "data.name=digits",
                                    "teacher.name=mimkit:{ws}/none.pt", "output_dir={ws}/t4"], ["none.pt"]),
    ("tokenizer info on a checkpoint", ["tokenizer", "info", "{ws}/run/checkpoints/last.pt"], ["last.pt", "tokenizer"]),
    ("fsq vocabulary against its levels", ["tokenizer", "train", "kind=fsq", "vocab_size=512", "fsq.levels=[8,8,4]"],
     ["vocab_size=512", "fsq.levels=[8, 8, 4]", "256 codes"]),
    ("fsq level below 2", ["tokenizer", "train", "kind=fsq", "fsq.levels=[8,1]", "fsq.objective=pixels"],
     ["fsq.levels"]),
    ("lfq without a teacher", ["tokenizer", "train", "kind=lfq", "data.name=digits"],
     ["teacher.name", "lfq.objective=pixels"]),
    ("lfq entropy groups too wide", ["tokenizer", "train", "kind=lfq", "lfq.dim=20", "lfq.entropy_groups=1"],
     ["lfq.entropy_groups=1", "20 bits"]),
    ("peco layer beyond the teacher", ["tokenizer", "train", "kind=peco", "data.name=digits", "peco.input_size=8",
                                       "peco.groups=2", "teacher.name=mimkit:{ws}/run/checkpoints/last.pt",
                                       "peco.layers=[9]", "output_dir={ws}/t5"], ["teacher.layer=9"]),
    ("lavit without a teacher", ["tokenizer", "train", "kind=lavit", "data.name=digits"],
     ["kind=lavit needs teacher.name"]),
    ("lavit keep ratio 0", ["tokenizer", "train", "kind=lavit", "data.name=digits", "lavit.keep_ratio=0",
                            "teacher.name=mimkit:{ws}/run/checkpoints/last.pt", "output_dir={ws}/t6"],
     ["lavit.keep_ratio"]),
    ("lavit width the selector cannot halve", ["tokenizer", "train", "kind=lavit", "data.name=digits",
                                               "lavit.embed_dim=66", "lavit.num_heads=2",
                                               "teacher.name=mimkit:{ws}/run/checkpoints/last.pt",
                                               "output_dir={ws}/t7"], ["lavit.embed_dim=66", "divisible by 4"]),
    ("unknown dropped-patch mode", ["pretrain", *SYN, "method=beit", "target.tokens.dropped=drop"],
     ["target.tokens.dropped", "ignore", "merged"]),
    ("prefer kept patches without a lavit tokenizer", ["pretrain", *SYN, "mask.prefer_kept=true"],
     ["mask.prefer_kept=true", "lavit", "target.kind=pixels"]),
    # studies
    ("study refers to an undefined tokenizer", ["study", "--config", "{ws}/study_bad_ref.yaml"],
     ["cells.b.tokenizer", "'vq'"]),
    ("study cell with a misspelled key", ["study", "--config", "{ws}/study_bad_key.yaml"],
     ["cell:a", "optim.bllr"]),
    ("study only an unknown step", ["study", "--config", "{ws}/study_ok.yaml", "--only", "cell:zz"],
     ["--only", "cell:zz", "cell:a"]),
    # probes, export and analysis
    ("probe without checkpoint file", ["probe", "knn", "--checkpoint", "{ws}/none.pt"], ["none.pt"]),
    ("probe on a foreign file", ["probe", "linear", "--checkpoint", "{ws}/foreign.pt"], ["foreign.pt", "not a mimkit"]),
    ("probe the EMA teacher of an MAE run", ["probe", "knn", "--checkpoint", "{ws}/run/checkpoints/last.pt",
                                             "encoder=ema"], ["encoder=ema", "data2vec2"]),
    ("probe misspelled key", ["probe", "knn", "--checkpoint", "{ws}/run/checkpoints/last.pt", "knn.kk=5"], ["knn.kk"]),
    ("export of a text file", ["export", "--checkpoint", "{ws}/notes.txt", "--out", "{ws}/x.pt"], ["notes.txt"]),
    ("export a tokenizer as hf", ["export", "--format", "hf", "{ws}/tok.pt", "{ws}/hf"], ["--format hf", "safetensors"]),
    ("probe a timm model without weights", ["probe", "knn", "--checkpoint", "timm:vit_tiny_patch16_224"],
     ["timm:vit_tiny_patch16_224", "--weights"]),
    ("probe a timm model with missing weights", ["probe", "knn", "--checkpoint", "timm:vit_tiny_patch16_224",
                                                 "--weights", "{ws}/none.pt"], ["none.pt", "no such file"]),
    ("weights beside a mimkit checkpoint", ["probe", "knn", "--checkpoint", "{ws}/run/checkpoints/last.pt",
                                            "--weights", "{ws}/teacher.pth"], ["weights", "timm:<model>"]),
    ("convert a file of no known format", ["convert", "{ws}/foreign.pt", "{ws}/c.pt"],
     ["foreign.pt", "mae", "beitv2", "ijepa", "closest"]),
    ("tokenizer import of a non-VQ-KD file", ["tokenizer", "import", "--kind", "vqkd", "{ws}/foreign.pt", "{ws}/t.pt"],
     ["foreign.pt", "VQ-KD"]),
    ("analyze a missing tokenizer", ["analyze", "tokens", "--tokenizer", "{ws}/none.pt", "--out", "{ws}/a1"],
     ["none.pt"]),
    ("analyze predictions of an MAE run", ["analyze", "predictions", "--checkpoint", "{ws}/run/checkpoints/last.pt",
                                           "--tokenizer", "{ws}/tok.pt", "--out", "{ws}/a2"], ["mae"]),
]


def digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and "tb" not in p.parts and p.name != "log.txt"}


@pytest.mark.parametrize("name, argv, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(ws, capsys, name, argv, words):
    if name == "cuda without a gpu" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    before = digest(ws)
    argv = [a.replace("{ws}", str(ws)) for a in argv]
    with pytest.raises(SystemExit) as e:
        raise SystemExit(main(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for w in words:
        assert w.replace("{ws}", str(ws)) in err[0], (w, err[0])
    after = digest(ws)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing that existed was changed
