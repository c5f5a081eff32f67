"""docs/architecture.md's examples run as written: the toy target registers from here and trains through
`mimkit pretrain`; the recipe-only method composes existing parts."""
import json
import re

import pytest
import torch

from conftest import REPO
from mimkit.cli import main
from mimkit.methods import METHODS
from mimkit.parts import METHOD_SECTIONS, RECIPES, TARGET_SECTIONS
from mimkit.targets import TARGETS

DOC = (REPO / "docs" / "architecture.md").read_text()


def example(heading: str) -> str:
    """The first ```python block under `## <heading>` in docs/architecture.md."""
    section = DOC.split(f"## {heading}\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture
def mean_color():
    namespace = {}
    exec(compile(example("Add a target"), "architecture.md", "exec"), namespace)
    yield namespace["MeanColor"]
    TARGETS.pop("mean_color")
    TARGET_SECTIONS.pop("mean_color")  # registering recorded its config section too (read by later configs)


def test_toy_target_is_each_patch_mean_colour(mean_color):
    from mimkit.targets import TargetContext
    ctx = TargetContext(img_size=4, patch_size=2, data_name="synthetic")
    imgs = torch.arange(48, dtype=torch.float32).view(1, 3, 4, 4)
    rgb = mean_color(mean_color.Config(), ctx)(imgs)
    assert rgb.shape == (1, 4, 3) and mean_color(mean_color.Config(), ctx).out_dim == 3
    # top-left patch, channel 0: pixels 0, 1, 4, 5
    assert rgb[0, 0, 0].item() == pytest.approx((0 + 1 + 4 + 5) / 4)
    assert torch.allclose(rgb[0, :, 1], rgb[0, :, 0] + 16) and torch.allclose(rgb[0, :, 2], rgb[0, :, 0] + 32)
    grey = mean_color(mean_color.Config(per_channel=False), ctx)(imgs)
    assert grey.shape == (1, 4, 1) and torch.allclose(grey[..., 0], rgb.mean(-1))


def test_toy_target_trains_through_mimkit_pretrain(mean_color, tmp_path):
    out = tmp_path / "toy"
    assert main(["pretrain", "data.name=synthetic", "data.synthetic_size=128", "epochs=3", "target.kind=mean_color",
                 "target.mean_color.per_channel=false", f"output_dir={out}"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["final_loss"] < metrics["first_loss"], metrics["loss_history"]
    saved = (out / "config.yaml").read_text()
    assert "kind: mean_color" in saved and "per_channel: false" in saved
    head = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["model"]["decoder.pred.weight"]
    assert head.shape[0] == 1  # the decoder predicts the target's one value per patch


def test_a_float_target_with_cross_entropy_is_one_clear_error(tmp_path, capsys):
    assert main(["pretrain", "data.name=synthetic", "loss=ce", f"output_dir={tmp_path / 'x'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "loss=ce" in err[0] and "use loss=mse or l1" in err[0]
    assert not (tmp_path / "x").exists()


def test_toy_tokenizer_kind_trains_and_feeds_clustermim(tmp_path):
    from mimkit.tokenizer_config import TOKENIZER_RECIPES, TOKENIZER_SECTIONS
    from mimkit.tokenizers import TOKENIZERS, Tokenizer
    namespace = {}
    exec(compile(example("Add a tokenizer kind"), "architecture.md", "exec"), namespace)
    try:
        tok_dir = tmp_path / "grey"
        assert main(["tokenizer", "train", "kind=grey", "data.name=synthetic", f"output_dir={tok_dir}"]) == 0
        tok = Tokenizer.load(tok_dir / "tokenizer.pt")
        assert tok.kind == "grey" and tok.vocab_size == 16 and tok.grid == 4
        imgs = torch.zeros(1, 3, 16, 16)
        imgs[..., :4, :4] = 2.5  # one bright patch in the top-left corner, the rest at the middle grey level
        ids = tok.encode(imgs)
        assert ids[0, 0] == 15 and (ids[0, 1:] == ids[0, 1]).all() and 0 < ids[0, 1] < 15
        out = tmp_path / "clustermim"
        assert main(["pretrain", "method=clustermim", "data.name=synthetic", "data.synthetic_size=64", "epochs=1",
                     f"target.tokens.tokenizer={tok_dir / 'tokenizer.pt'}", f"output_dir={out}"]) == 0
        model = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["model"]
        assert model["decoder.pred.weight"].shape[0] == 16  # one logit per grey level
    finally:
        TOKENIZERS.pop("grey")
        TOKENIZER_SECTIONS.pop("grey")  # registering recorded its section and recipe too (read by later configs)
        TOKENIZER_RECIPES.pop("grey")


def test_recipe_only_method_composes_existing_parts(tmp_path):
    namespace = {}
    exec(compile(example("Add a method"), "architecture.md", "exec"), namespace)
    try:
        out = tmp_path / "m"
        assert main(["pretrain", "method=simmim_hog", "data.name=synthetic", "data.synthetic_size=64", "epochs=1",
                     f"output_dir={out}"]) == 0
        model = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["model"]
        assert model["head.weight"].shape[0] == 3 * 9 * 2 ** 2  # HOG: 3 channels x 9 bins x 2x2 cells
    finally:
        METHODS.pop("simmim_hog")
        METHOD_SECTIONS.pop("simmim_hog")
        RECIPES.pop("simmim_hog")
