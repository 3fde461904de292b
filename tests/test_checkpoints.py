"""Public checkpoint layouts and built-in models: each layout, written as its publisher wrote it, must load
into our model and compute exactly what the source model computes; bad files must fail with a clear message."""

from __future__ import annotations

import pathlib
import re

import pytest
import torch

from arenaseg.models import registry
from arenaseg.models.checkpoints import (
    BTCV_CLASSES,
    FSEFT_CHANNELS,
    detect_layout,
    load_public_checkpoint,
    map_to_swin_unetr,
    unwrap,
)
from arenaseg.models.foundation import save_foundation
from arenaseg.models.registry import class_row, load_model
from arenaseg.models.swin_unetr import HEAD_NAME, ModelConfig, build_swin_unetr, replace_with_binary_head

# Window 4 instead of 7 keeps a forward pass well under a second; 64x32x32 is the smallest input whose
# bottleneck (1/32 scale) has more than one voxel, which MONAI's instance norm needs even in eval mode.
SHAPE = (1, 1, 64, 32, 32)
CLIP_EXTRAS = {
    "module.precls_conv.0.weight": (12,),
    "module.GAP.3.weight": (8, 192, 1, 1, 1),
    "module.controller.weight": (153, 16, 1, 1, 1),
    "module.organ_embedding.weight": (32, 8),
    "module.text_to_vision.weight": (8, 16),
}
SSL_EXTRAS = {"module.rotation_head.weight": (4, 192), "module.contrastive_head.weight": (16, 192)}


def tiny(out_channels: int, legacy: bool = True) -> ModelConfig:
    return ModelConfig.tiny(out_channels, window_size=4, legacy_merging=legacy)


def source_model(config: ModelConfig, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_swin_unetr(config).eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))


def run(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Logits and the decoder's last features (what CLIP-Driven's own head reads)."""
    seen = {}
    hook = model.decoder1.register_forward_hook(lambda m, i, out: seen.update(features=out))
    with torch.no_grad():
        seen["logits"] = model(x)
    hook.remove()
    return seen


def encoder(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return model.swinViT(x)


@pytest.fixture(scope="module")
def btcv_src(x):
    model = source_model(tiny(len(BTCV_CLASSES)))
    return model, run(model, x)


@pytest.fixture(scope="module")
def fseft_src(x):
    model = source_model(tiny(FSEFT_CHANNELS), seed=2)
    return model, run(model, x)


def extras(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {k: torch.randn(s) for k, s in shapes.items()}


def fseft_file(model) -> dict:
    """DistributedDataParallel state dict, bare, head named classifier."""
    return {"module." + k.replace(HEAD_NAME, "classifier"): v for k, v in model.state_dict().items()}


def btcv_file(model) -> dict:
    return {"epoch": 5000, "best_acc": 0.8, "state_dict": model.state_dict()}


def btcv_swin_vit_file(model) -> dict:
    return {"module." + k.replace("swinViT", "swin_vit"): v for k, v in model.state_dict().items()}


def ssl_file(model) -> dict:
    """Encoder only, no swinViT prefix, original Swin MLP names, plus the self-supervision heads."""
    encoder_keys = {
        "module." + k.removeprefix("swinViT.").replace("mlp.linear", "mlp.fc"): v
        for k, v in model.state_dict().items()
        if k.startswith("swinViT.")
    }
    return {"state_dict": encoder_keys | extras(SSL_EXTRAS)}


def clip_file(model) -> dict:
    """Universal Model: SwinUNETR without its out head as module.backbone, plus the text-conditioned head."""
    backbone = {"module.backbone." + k: v for k, v in model.state_dict().items() if not k.startswith("out.")}
    return {"net": backbone | extras(CLIP_EXTRAS), "epoch": 2100}


def save(obj, path: pathlib.Path) -> pathlib.Path:
    torch.save(obj, path)
    return path


@pytest.mark.parametrize(
    ("writer", "layout"),
    [(fseft_file, "fseft"), (btcv_file, "monai-btcv"), (btcv_swin_vit_file, "monai-btcv")],
)
def test_full_layouts_compute_what_the_source_computes(writer, layout, btcv_src, fseft_src, x, tmp_path):
    model, out = fseft_src if layout == "fseft" else btcv_src
    loaded = load_public_checkpoint(save(writer(model), tmp_path / "ck.pth"))
    assert loaded.layout == layout
    assert loaded.config.legacy_merging
    assert loaded.missing == [] and loaded.ignored == []
    assert loaded.loaded == list(model.state_dict())
    assert torch.equal(run(loaded.model.eval(), x)["logits"], out["logits"])


def test_ssl_encoder_loads_and_reports_the_random_decoder(btcv_src, x, tmp_path):
    model, _ = btcv_src
    loaded = load_public_checkpoint(save(ssl_file(model), tmp_path / "model_swinvit.pt"))
    assert loaded.layout == "monai-ssl" and loaded.config.legacy_merging
    for got, want in zip(encoder(loaded.model.eval(), x), encoder(model, x), strict=True):
        assert torch.equal(got, want)
    own = list(loaded.model.state_dict())
    assert loaded.missing == [k for k in own if not k.startswith("swinViT.")]
    assert loaded.loaded == [k for k in own if k.startswith("swinViT.")]
    assert sorted(loaded.ignored) == sorted(SSL_EXTRAS)
    assert loaded.head_kind is None and loaded.config.out_channels == 1
    text = loaded.summary()
    assert "random initialisation" in text and "decoder1" in text and "rotation_head" in text


def test_clip_driven_backbone_loads_and_ignores_its_head_modules(btcv_src, x, tmp_path):
    model, out = btcv_src
    loaded = load_public_checkpoint(save(clip_file(model), tmp_path / "universal.pth"), out_channels=4)
    assert loaded.layout == "clip-driven/suprem" and loaded.config.legacy_merging
    assert sorted(loaded.ignored) == sorted(CLIP_EXTRAS)
    assert loaded.missing == [f"{HEAD_NAME}.weight", f"{HEAD_NAME}.bias"]
    assert loaded.config.out_channels == 4 and loaded.head_kind is None
    assert torch.equal(run(loaded.model.eval(), x)["features"], out["features"])
    assert "GAP" in loaded.summary() and "organ_embedding" in loaded.summary()


def test_bare_current_monai_state_is_ours_and_keeps_current_merging(x, tmp_path):
    model = source_model(tiny(3, legacy=False))
    path = save(model.state_dict(), tmp_path / "ours.pt")
    loaded = load_public_checkpoint(path)
    assert loaded.layout == "arenaseg" and not loaded.config.legacy_merging
    assert torch.equal(run(loaded.model.eval(), x)["logits"], run(model, x)["logits"])
    forced = load_public_checkpoint(path, layout="monai-btcv")
    assert forced.layout == "monai-btcv" and forced.config.legacy_merging


def test_legacy_and_current_patch_merging_differ_on_the_same_weights(btcv_src, x):
    model, _ = btcv_src
    current = build_swin_unetr(tiny(len(BTCV_CLASSES), legacy=False)).eval()
    current.load_state_dict(model.state_dict(), strict=True)
    legacy_out, current_out = encoder(model, x), encoder(current, x)
    assert torch.equal(legacy_out[0], current_out[0])  # before the first merging the two are the same network
    assert (legacy_out[1] - current_out[1]).abs().max() > 1e-2


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        (
            {"fc.weight": torch.zeros(2, 2), "fc.bias": torch.zeros(2)},
            "unrecognised checkpoint layout.*fc.weight",
        ),
        ([torch.zeros(2)], "not a state dict: the file holds a list"),
        ({"epoch": 3, "lr": 0.1}, "not a state dict: entry 'epoch' at top level is a int"),
        ({"state_dict": {}}, "not a state dict: empty mapping under 'state_dict'"),
    ],
)
def test_files_that_are_not_swin_unetr_state_dicts_are_refused(obj, message, tmp_path):
    path = save(obj, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=f"{path}.*{message}"):
        load_public_checkpoint(path)


def test_truncated_and_missing_files_name_the_file(btcv_src, tmp_path):
    full = save(btcv_file(btcv_src[0]), tmp_path / "full.pt").read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(full[: len(full) // 2])
    with pytest.raises(ValueError, match=f"{cut}: not a readable PyTorch checkpoint \\(truncated or corrupt"):
        load_public_checkpoint(cut)
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_public_checkpoint(tmp_path / "nowhere.pt")


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [({"feature_size": 24}, "swinViT.patch_embed.proj.weight"), ({"out_channels": 5}, f"{HEAD_NAME}.weight")],
)
def test_shape_that_does_not_fit_names_the_key_and_both_shapes(kwargs, key, btcv_src, tmp_path):
    model = btcv_src[0]
    path = save(btcv_file(model), tmp_path / "ck.pt")
    file_shape = tuple(model.state_dict()[key].shape)
    config = tiny(kwargs.get("out_channels", len(BTCV_CLASSES)))
    wanted = ModelConfig(**{**config.to_dict(), **kwargs})
    model_shape = tuple(build_swin_unetr(wanted).state_dict()[key].shape)
    assert file_shape != model_shape
    message = f"shape mismatch at '{key}': file {file_shape} vs model {model_shape}"
    with pytest.raises(ValueError, match=re.escape(message)):
        load_public_checkpoint(path, **kwargs)


class WritesMarker:
    """Unpickling this calls Path.write_text: the shape of a malicious checkpoint, with a harmless payload."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.write_text, (self.marker, "code ran")


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "marker"
    path = save({"state_dict": {"w": torch.zeros(1)}, "payload": WritesMarker(marker)}, tmp_path / "evil.pt")
    torch.load(path, weights_only=False)  # the payload is live: a full unpickle runs it
    assert marker.exists()
    marker.unlink()
    with pytest.raises(ValueError, match="refused.*could run code"):
        load_public_checkpoint(path)
    assert not marker.exists()


def test_detection_and_mapping_on_states_without_files(btcv_src):
    model = btcv_src[0]
    assert detect_layout(model.state_dict()) == "arenaseg"
    assert detect_layout(btcv_file(model)) == "monai-btcv"
    assert unwrap(btcv_file(model)).keys() == model.state_dict().keys()
    mapped, ignored = map_to_swin_unetr(unwrap(ssl_file(model)), "monai-ssl")
    assert mapped.keys() == {k for k in model.state_dict() if k.startswith("swinViT.")}
    assert sorted(ignored) == sorted(SSL_EXTRAS)
    with pytest.raises(ValueError, match="unknown layout 'swin'; known: fseft, monai-btcv"):
        map_to_swin_unetr(model.state_dict(), "swin")


def test_unknown_model_name_lists_builtins_and_accepts_paths():
    with pytest.raises(ValueError, match=r"'nope' is neither a built-in model \(btcv-fs, phantom-demo\).*path"):
        load_model("nope")


def test_builtin_models_load_from_the_package_folder(monkeypatch, btcv_src, tmp_path):
    monkeypatch.setattr(registry, "BUILTIN_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match=f"built-in model 'phantom-demo' is not installed: {tmp_path}"):
        load_model("phantom-demo")
    model = btcv_src[0]
    save_foundation(tmp_path / "phantom-demo", model, tiny(len(BTCV_CLASSES)), card={"name": "phantom-demo"})
    loaded = load_model("phantom-demo")
    assert loaded.layout == "arenaseg" and loaded.head_kind == "softmax" and loaded.class_rows == {}
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v)


def test_load_model_routes_files_by_type(fseft_src, tmp_path):
    assert load_model(str(save(fseft_file(fseft_src[0]), tmp_path / "fseft.pth"))).layout == "fseft"
    other = tmp_path / "weights.npz"
    other.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"unsupported file type '\.npz'"):
        load_model(str(other))


def test_class_rows_of_each_head(btcv_src, fseft_src, tmp_path):
    fseft = load_model(str(save(fseft_file(fseft_src[0]), tmp_path / "fseft.pth")))
    assert class_row(fseft, "left_kidney") == (2, None) == class_row(fseft, "Kidney left")
    assert class_row(fseft, "duodenum") == (13, None)
    assert class_row(fseft, "right_kidney") is None
    btcv = load_model(str(save(btcv_file(btcv_src[0]), tmp_path / "btcv.pt")))
    assert class_row(btcv, "kidney_left") == (3, 0) == class_row(btcv, "left kidney")
    assert class_row(btcv, "inferior vena cava") == (9, 0)
    assert class_row(btcv, "duodenum") is None
    ssl = load_model(str(save(ssl_file(btcv_src[0]), tmp_path / "ssl.pt")))
    assert class_row(ssl, "liver") is None
    for names in (("background", "liver", "pancreas"), ("liver", "pancreas")):
        config = ModelConfig(**{**tiny(3, legacy=False).to_dict(), "class_names": names})
        ours = load_model(str(save_foundation(tmp_path / "ours", build_swin_unetr(config), config)))
        assert class_row(ours, "pancreas") == (2, 0) and class_row(ours, "liver") == (1, 0)
        assert class_row(ours, "background") is None


@pytest.mark.parametrize("layout", ["monai-btcv", "fseft"])
def test_zero_shot_binary_head_reproduces_the_class_log_odds(layout, btcv_src, fseft_src, x, tmp_path):
    model, out = btcv_src if layout == "monai-btcv" else fseft_src
    writer = btcv_file if layout == "monai-btcv" else fseft_file
    loaded = load_model(str(save(writer(model), tmp_path / "ck.pt")))
    row, background = class_row(loaded, "liver")
    replace_with_binary_head(loaded.model, row, background)
    expected = out["logits"][:, row] - (0 if background is None else out["logits"][:, background])
    torch.testing.assert_close(run(loaded.model.eval(), x)["logits"][:, 0], expected)
