"""Probing and fine-tuning models timm and open_clip build (`--checkpoint timm:<arch>|openclip:<arch> --weights
FILE`), from random weights written to a local file (nothing is downloaded): the probes' features are those of the
library's own model run on the same images in its own normalization, fine-tuning trains the model itself with
layer-wise lr decay on its blocks, and the fine-tuned output is probed as a checkpoint."""
import copy
import json

import pytest
import timm
import torch

from mimkit import checkpoint
from mimkit.cli import main
from mimkit.data import Transformed, build_dataset, dataset_stats, eval_transform
from mimkit.probes.finetune import layer_decay_groups
from mimkit.probes.finetune_model import Classifier
from mimkit.probes.run import build_probe_config
from mimkit.teachers import load_finetuned, load_probe_encoder
from mimkit.weights import write_safetensors

# a ViT-Tiny shrunk through timm's kwargs; the shape rides in the file's metadata as `mimkit export` writes it
TIMM_ARGS = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}
TIMM_STATS = {"mean": [0.4, 0.4, 0.4], "std": [0.3, 0.3, 0.3]}
# a tiny CLIP registered from a config file: the path of a real one (openclip:ViT-B-16), without its size
CLIP = {"embed_dim": 24, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
        "text_cfg": {"context_length": 8, "vocab_size": 50, "width": 32, "heads": 2, "layers": 1}}
SMALL = ["data.name=digits", "data.limit=96", "data.test_limit=48", "features.cache=true"]
FT = ["epochs=1", "batch_size=32", "optim.warmup_epochs=0", "finetune.eval_every=1"]


def jitter(model):
    with torch.no_grad():  # every parameter non-trivial (inits leave biases and norms constant)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def timm_vit(tmp_path_factory):
    path = tmp_path_factory.mktemp("timm") / "vit.safetensors"
    torch.manual_seed(0)
    model = jitter(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **TIMM_ARGS))
    write_safetensors(model.state_dict(), path, {"model_args": TIMM_ARGS, "pretrained_cfg": TIMM_STATS})
    return model, path


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    open_clip = pytest.importorskip("open_clip", reason="open_clip is not installed (pip install open_clip_torch)")
    root = tmp_path_factory.mktemp("clip")
    (root / "cfg").mkdir()
    (root / "cfg" / "mimkit-probe-clip.json").write_text(json.dumps(CLIP))
    open_clip.add_model_config(root / "cfg")
    torch.manual_seed(1)
    model = jitter(open_clip.create_model("mimkit-probe-clip"))
    torch.save(model.state_dict(), root / "clip.pt")  # the whole CLIP: the probe keeps its image tower
    model.visual.output_tokens = True
    return model.visual, root / "clip.pt"


def images(protocol: str, spec: str, weights, args: list[str], split: str) -> torch.Tensor:
    """The images of `split` the probe reads, in its loader's order, normalized with the data's stats."""
    cfg = build_probe_config(protocol, spec, [], [f"weights={weights}", *args])[0]
    limit = cfg.data.limit if split == "train" else cfg.data.test_limit
    data = Transformed(build_dataset(cfg.data, split, limit), eval_transform(cfg.data))
    return torch.stack([data[i][0] for i in range(len(data))])


def cached(out, split: str, pool: str, layer: int) -> torch.Tensor:
    name = f"digits_{split}_{pool}_{f'layer{layer}' if layer else 'final'}_"
    (path,) = [p for p in (out.parent / "feature_cache").iterdir() if p.name.startswith(name)]
    return torch.load(path, weights_only=True)["features"]


def renormalized(x: torch.Tensor, mean, std) -> torch.Tensor:
    """Digits normalized with the data's stats -> with the model's (mean, std)."""
    dm, ds = (torch.tensor(v).view(1, 3, 1, 1) for v in dataset_stats("digits"))
    return (x * ds + dm - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def clip_features(visual, x: torch.Tensor, pool: str, layer: int) -> torch.Tensor:
    """open_clip's tower on the digits in CLIP's own normalization: pool=cls is its image embedding (projected),
    mean the mean of its projected patch tokens, layer k (pool=cls) block k's CLS token."""
    x = renormalized(x, visual.image_mean or (0.48145466, 0.4578275, 0.40821073),  # OpenAI CLIP's, open_clip's
                     visual.image_std or (0.26862954, 0.26130258, 0.27577711))  # default for untagged models
    seen = {}
    hook = visual.transformer.resblocks[max(layer - 1, 0)].register_forward_hook(
        lambda m, a, out: seen.__setitem__("out", out))
    with torch.no_grad():
        embedding, tokens = visual(x)
    hook.remove()
    if layer:
        return seen["out"][:, 0]
    return embedding if pool == "cls" else (tokens @ visual.proj).mean(dim=1)


def test_openclip_knn_and_linear_probe_the_towers_own_features(clip, tmp_path):
    visual, weights = clip
    spec = "openclip:mimkit-probe-clip"
    assert visual.image_size == (32, 32)
    for protocol, pool, layer in (("knn", "cls", 0), ("knn", "cls", 1), ("linear", "mean", 0)):
        out = tmp_path / f"{protocol}_{pool}_{layer}"
        args = [*SMALL, f"features.pool={pool}", f"features.layer={layer}", "knn.random_init=false",
                "epochs=2", f"output_dir={out}"]
        assert main(["probe", protocol, "--checkpoint", spec, "--weights", str(weights), *args]) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["img_size"] == 32 and 0 <= metrics["top1"] <= 100
        for split in ("train", "test"):
            ours = cached(out, split, pool, layer)
            expected = clip_features(visual, images(protocol, spec, weights, args, split), pool, layer)
            assert ours.shape == expected.shape and ours.shape[0] == (96 if split == "train" else 48)
            assert torch.allclose(ours, expected, atol=1e-5), (protocol, pool, layer, (ours - expected).abs().max())


def lr_scales(groups: list[dict], model) -> dict[str, float]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}


def test_layer_decay_reads_the_blocks_of_timm_and_openclip_models(timm_vit, clip):
    """decay^(L+1-layer_id) with the embeddings at 0, block i at i+1, final norm and head at L+1 (MAE/BEiT)."""
    stats = dataset_stats("digits")
    for spec, weights, stem, block in (("timm:vit_tiny_patch16_224", timm_vit[1], "model.patch_embed.proj.weight",
                                        "model.blocks.{}.attn.qkv.weight"),
                                       ("openclip:mimkit-probe-clip", clip[1], "model.conv1.weight",
                                        "model.transformer.resblocks.{}.attn.in_proj_weight")):
        model = Classifier(load_probe_encoder(spec, str(weights), stats), num_classes=10)
        scales = lr_scales(layer_decay_groups(model, 0.05, 0.5), model)
        assert scales[stem] == 0.5 ** 3 and scales["head.weight"] == 1.0, spec
        assert [scales[block.format(i)] for i in range(2)] == [0.5 ** 2, 0.5], spec
        decayed = {n for g in layer_decay_groups(model, 0.05, 0.5) if g["weight_decay"] for n in
                   lr_scales([g], model)}
        assert stem in decayed and not any("pos" in n or "bias" in n for n in decayed), spec


@pytest.mark.parametrize("which", ["timm", "openclip"])
def test_finetune_a_foreign_model_then_probe_its_output(which, timm_vit, clip, tmp_path):
    """One epoch on digits trains the model itself (its weights move, a fresh head), and `probe knn --checkpoint
    <output>/checkpoints/best.pt` probes the fine-tuned model: the same features as the fine-tuned weights give."""
    spec, weights = (("timm:vit_tiny_patch16_224", timm_vit[1]) if which == "timm" else
                     ("openclip:mimkit-probe-clip", clip[1]))
    out = tmp_path / "ft"
    assert main(["probe", "finetune", "--checkpoint", spec, "--weights", str(weights), *SMALL, *FT,
                 f"output_dir={out}"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["img_size"] == (16 if which == "timm" else 32) and metrics["n_train"] == 96
    best = out / "checkpoints" / "best.pt"
    saved = checkpoint.load(best, "finetune")
    assert saved["encoder"]["prefix"] == "model." and saved["model"]["head.weight"].shape[0] == 10
    before = load_probe_encoder(spec, str(weights), dataset_stats("digits")).teacher.model.state_dict()
    tuned = load_finetuned(str(best))
    after = tuned.model.state_dict()
    assert set(before) >= set(after) and any(not torch.equal(before[k], after[k]) for k in after)
    assert all(torch.equal(v, saved["model"][f"model.{k}"]) for k, v in after.items())
    knn = tmp_path / "knn"
    assert main(["probe", "knn", "--checkpoint", str(best), *SMALL, "knn.random_init=false",
                 f"output_dir={knn}"]) == 0
    x = images("knn", str(best), "", SMALL, "test")
    if which == "timm":  # timm's model of the same shape with the fine-tuned weights, on its own normalization
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **TIMM_ARGS).eval()
        model.load_state_dict(after)
        with torch.no_grad():
            expected = model.forward_head(model.forward_features(renormalized(x, **TIMM_STATS)), pre_logits=True)
    else:
        visual = copy.deepcopy(clip[0])
        visual.load_state_dict(after)
        expected = clip_features(visual.eval(), x, "cls", 0)
    assert torch.allclose(cached(knn, "test", "cls", 0), expected, atol=1e-5)


def test_a_mimkit_encoders_finetune_output_is_probed_as_its_timm_model(digits_teacher, tmp_path):
    """The fine-tune of a mimkit checkpoint records its timm VisionTransformer (avg pool, fc_norm) with the data's
    normalization: `probe knn --checkpoint best.pt` reads that model's pooled features."""
    from timm.models.vision_transformer import VisionTransformer
    out = tmp_path / "ft"
    assert main(["probe", "finetune", "--checkpoint", str(digits_teacher), *SMALL, *FT, f"output_dir={out}"]) == 0
    best = checkpoint.load(out / "checkpoints" / "best.pt", "finetune")
    assert main(["probe", "knn", "--checkpoint", str(out / "checkpoints" / "best.pt"), *SMALL,
                 "knn.random_init=false", f"output_dir={tmp_path / 'knn'}"]) == 0
    model = VisionTransformer(**best["timm_kwargs"]).eval()
    model.load_state_dict(best["model"])
    x = images("knn", str(out / "checkpoints" / "best.pt"), "", SMALL, "test")
    assert x.shape[-1] == 8  # the digits preset's size, which the fine-tune recorded
    with torch.no_grad():
        expected = model.forward_head(model.forward_features(x), pre_logits=True)
    assert torch.allclose(cached(tmp_path / "knn", "test", "cls", 0), expected, atol=1e-5)
