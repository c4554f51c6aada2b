"""Parameter-efficient freeze modes (autoft.adapters): LoRA, LoRA + biases, BitFit, norm-only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import autoft
from autoft import adapters, blocks, export
from autoft.errors import AutoftError
from autoft.recipe import Recipe
from autoft.space import load_space, preset_names
from autoft.tasks.base import Dataset
from autoft.tasks.image import models
from autoft.trial import TrialOutcome, run_trial
from conftest import colour_split, image_setup

SIZE = 16


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    return Dataset(
        ("r", "g", "b"), colour_split(8, seed=0), colour_split(4, seed=1), None, Path("."), 0, image_size=SIZE
    )


def _model(name: str = "test_vit") -> nn.Module:
    torch.manual_seed(0)
    return models.create(name, num_classes=3, pretrained=False)


def _recipe(freeze: str, **fields: object) -> Recipe:
    base = {"freeze": freeze, "epochs": 2, "batch_size": 8, "lr": 1e-2, "augment": "none", "weight_decay": 0.0}
    return Recipe.from_params(base | fields)


def _changed(outcome: TrialOutcome, model: nn.Module) -> set[str]:
    """Parameters (not buffers) the trial moved away from the base model."""
    before = dict(model.named_parameters())
    return {k for k, v in outcome.best_state.items() if k in before and not torch.equal(v, before[k].detach())}


# ----------------------------------------------------------------------------------------------- target layers


def test_lora_targets_follow_the_architecture() -> None:
    vit = _model("test_vit")
    attention = adapters.lora_targets(vit, Recipe(freeze="lora"))
    assert attention and all(n.endswith(("attn.qkv", "attn.proj")) for n in attention)
    both = adapters.lora_targets(vit, Recipe(freeze="lora", lora_targets="attention+mlp"))
    assert set(both) - set(attention) and all(n.endswith(("attn.qkv", "attn.proj", "fc1", "fc2")) for n in both)
    for name in ("test_resnet", "test_efficientnet"):  # CNNs: their convolutions, never depthwise, never the head
        model = _model(name)
        convs = adapters.lora_targets(model, Recipe(freeze="lora"))
        modules = dict(model.named_modules())
        assert convs and all(isinstance(modules[n], nn.Conv2d) and modules[n].groups == 1 for n in convs)
        assert not any(id(modules[n]) in {id(m) for m in model.get_classifier().modules()} for n in convs)


def test_lora_targets_of_a_bert_family_model() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, num_labels=3
    )

    class Bert(transformers.BertForSequenceClassification):  # what the text task's wrapper adds: the head
        def get_classifier(self) -> nn.Module:
            return self.classifier

    bert = Bert(config)
    attention = adapters.lora_targets(bert, Recipe(freeze="lora"))
    assert {n.split("layer.0.")[-1] for n in attention if "layer.0." in n} == {
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
    }
    both = adapters.lora_targets(bert, Recipe(freeze="lora", lora_targets="attention+mlp"))
    assert {n.split("layer.1.")[-1] for n in both if "layer.1." in n} >= {"intermediate.dense", "output.dense"}
    assert not any("pooler" in n or "classifier" in n for n in both)


def test_lora_modules_override_and_clear_errors() -> None:
    vit = _model("test_vit")
    named = adapters.lora_targets(vit, Recipe(freeze="lora", lora_modules="fc2"))
    assert named and all(n.endswith("mlp.fc2") for n in named)
    with pytest.raises(AutoftError, match=r"lora_modules='nope' names no Linear or convolution layer of model"):
        adapters.lora_targets(vit, Recipe(freeze="lora", lora_modules="nope"))

    class NormOnly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm, self.head = nn.LayerNorm(4), nn.Linear(4, 2)

        def get_classifier(self) -> nn.Module:
            return self.head

    with pytest.raises(AutoftError, match=r"^Model NormOnly has no layer LoRA can adapt"):
        adapters.lora_targets(NormOnly(), Recipe(freeze="lora"))


# ----------------------------------------------------------------------------------------------- merged = unmerged


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only"))],
)
def test_what_leaves_a_trial_is_a_copy_on_the_host_that_later_training_does_not_touch(device: str) -> None:
    """On CUDA the copies are queued together (pinned, non_blocking) and one sync ends them: they must have landed
    by the time ``to_host`` returns, and must not follow the weights as training goes on."""
    model = _model("test_resnet").to(device)
    adapters.add_lora(model, Recipe(freeze="lora", lora_rank=4, lora_targets="attention+mlp"))
    before = {k: v.detach().cpu().clone() for k, v in adapters.plain_state(model).items()}
    state, trained = adapters.plain_state(model), adapters.adapter_state(model)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    assert {v.device.type for v in [*state.values(), *trained.values()]} == {"cpu"}
    for key, value in state.items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["test_vit", "test_resnet"])
def test_the_merged_plain_model_gives_the_adapted_models_logits(name: str) -> None:
    model = _model(name)
    plain = _model(name)
    adapters.add_lora(model, Recipe(freeze="lora", lora_rank=4, lora_targets="attention+mlp"))
    with torch.no_grad():  # B starts at zero (the adapter starts as a no-op): give it something to merge
        for layer in adapters.lora_layers(model).values():
            layer.lora_B[adapters.ADAPTER_NAME].weight.normal_(0, 0.05)
    state = adapters.plain_state(model)
    assert state.keys() == plain.state_dict().keys()
    plain.load_state_dict(state)
    x = torch.randn(4, 3, SIZE, SIZE)
    with torch.no_grad():
        adapted, merged, base = model.eval()(x), plain.eval()(x), _model(name).eval()(x)
    assert (adapted - base).abs().max() > 1e-4  # the adapters changed the model: the merge is not trivial
    torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------- what trains


def test_lora_trial_trains_adapters_and_head_and_keeps_a_plain_model(dataset: Dataset) -> None:
    model = _model("test_vit")
    outcome = run_trial(image_setup(model, dataset), _recipe("lora"), seed=0)
    assert outcome.best_state.keys() == model.state_dict().keys()  # no base_layer, no lora_*: a plain model
    changed = _changed(outcome, model)
    assert {"head.weight", "blocks.0.attn.qkv.weight"} <= changed  # the merged update moved the target weight
    assert not changed & {"patch_embed.proj.weight", "blocks.0.mlp.fc1.weight", "blocks.0.attn.qkv.bias"}
    trained = set(outcome.adapter_state)
    assert outcome.notes["trainable_params"] == sum(v.numel() for v in outcome.adapter_state.values())
    assert "head.weight" in trained and all(".lora_" in k or k.startswith("head.") for k in trained)
    assert set(model.state_dict()) == set(_model("test_vit").state_dict())  # the base model was not touched


def test_lora_bias_also_trains_the_biases(dataset: Dataset) -> None:
    model = _model("test_vit")
    outcome = run_trial(image_setup(model, dataset), _recipe("lora_bias"), seed=0)
    assert {"blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.bias", "patch_embed.proj.bias"} <= _changed(outcome, model)
    assert "patch_embed.proj.weight" not in _changed(outcome, model)


def _norm_parameters(model: nn.Module) -> set[str]:
    norms = (nn.BatchNorm2d, nn.LayerNorm)
    return {
        f"{m_name}.{p_name}"
        for m_name, m in model.named_modules()
        if isinstance(m, norms)
        for p_name, _ in m.named_parameters(recurse=False)
    }


@pytest.mark.parametrize("name", ["test_vit", "test_resnet"])
@pytest.mark.parametrize("freeze", ["bitfit", "norm"])
def test_selective_modes_train_only_their_parameters_and_the_head(dataset: Dataset, freeze: str, name: str) -> None:
    model = _model(name)
    outcome = run_trial(image_setup(model, dataset), _recipe(freeze), seed=0)
    head = blocks.head_parameter_names(model)
    own = (
        {n for n, _ in model.named_parameters() if n.endswith("bias")}
        if freeze == "bitfit"
        else _norm_parameters(model)
    )
    changed = _changed(outcome, model)
    assert head <= changed and changed - head and changed - head <= own
    assert set(outcome.adapter_state) == own | head


def test_a_model_without_norm_layers_cannot_use_norm() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    model.get_classifier = lambda: model[1]
    with pytest.raises(AutoftError, match=r"has no normalization layer parameters for freeze=norm"):
        adapters.train_norms(model, Recipe(freeze="norm"))


# ----------------------------------------------------------------------------------------------- caches


@pytest.mark.parametrize("freeze", ["lora", "bitfit", "norm"])
def test_caches_are_refused_and_the_result_equals_the_uncached_trial(dataset: Dataset, freeze: str) -> None:
    model = _model("test_resnet")
    recipe = _recipe(freeze)
    cached_setup = image_setup(model, dataset, feature_cache="build", prefix_cache="build")
    cached = run_trial(cached_setup, recipe, seed=3)
    plain = run_trial(image_setup(model, dataset), recipe, seed=3)
    assert cached_setup.feature_cache.nbytes == 0 and cached_setup.prefix_cache.bytes_in("memory") == 0
    assert [h.val_loss for h in cached.history] == [h.val_loss for h in plain.history]
    for key, value in plain.best_state.items():
        torch.testing.assert_close(cached.best_state[key], value, rtol=0, atol=0, msg=key)


# ----------------------------------------------------------------------------------------------- export


def test_exported_lora_model_loads_without_adapters_and_writes_the_adapter(dataset: Dataset, tmp_path: Path) -> None:
    model = _model("test_vit")
    setup = image_setup(model, dataset)
    outcome = run_trial(setup, _recipe("lora", epochs=1), seed=0)
    meta = {"model": "test_vit", "trial": 0, "params": {"freeze": "lora"}} | setup.export_meta()
    adapter_meta = {"base_model": "test_vit", "base_weights_sha256": adapters.weights_hash(model)}
    export.save_model(tmp_path, outcome.best_state, meta, adapter=(outcome.adapter_state, adapter_meta))
    tuned = autoft.load_model(tmp_path, device="cpu")
    assert not adapters.lora_layers(tuned.model)  # a plain timm model: no peft at inference
    from safetensors import safe_open

    with safe_open(str(tmp_path / export.ADAPTER), framework="pt") as handle:
        stamp = handle.metadata()
        assert set(handle.keys()) == set(outcome.adapter_state)
    assert stamp["base_model"] == "test_vit" and len(stamp["base_weights_sha256"]) == 64 and stamp["trial"] == "0"
    export.save_model(tmp_path, outcome.best_state, meta)  # a model without an adapter leaves none behind
    assert not (tmp_path / export.ADAPTER).exists()


def test_weights_hash_names_the_backbone_weights() -> None:
    a, b = _model("test_resnet"), _model("test_resnet")
    assert adapters.weights_hash(a) == adapters.weights_hash(b)
    with torch.no_grad():
        b.fc.weight.add_(1)  # the head is the adapter's, not the base model's
    assert adapters.weights_hash(a) == adapters.weights_hash(b)
    with torch.no_grad():
        b.conv1[0].weight.add_(1)
    assert adapters.weights_hash(a) != adapters.weights_hash(b)


# ----------------------------------------------------------------------------------------------- recipe and spaces


def test_recipe_knobs_validate_and_describe() -> None:
    recipe = Recipe.from_params({"freeze": "lora", "lora_rank": 16, "lora_alpha": 32, "lora_targets": "attention+mlp"})
    assert recipe.describe().startswith("LoRA r16 alpha 32 on attention+mlp")
    assert Recipe(freeze="lora_bias").describe().startswith("LoRA r8 alpha 16 on attention + biases")
    assert Recipe(freeze="bitfit").train_blocks_at(0) is None and adapters.policy(Recipe(freeze="full")) is None
    with pytest.raises(AutoftError, match=r"lora_rank=0 is out of range"):
        Recipe(freeze="lora", lora_rank=0)
    with pytest.raises(AutoftError, match=r"lora_targets='mlp' is not known; choose one of: attention, attention\+mlp"):
        Recipe(freeze="lora", lora_targets="mlp")


def test_presets_search_the_new_modes_with_their_own_knobs() -> None:
    assert "peft" in preset_names()
    full = load_space("full")
    freeze = next(p for p in full.params if p.name == "freeze")
    assert {"lora", "lora_bias", "bitfit", "norm"} <= set(freeze.choices)
    peft = load_space("peft", overrides=["lora_targets.choices=[attention]"])
    rank = next(p for p in peft.params if p.name == "lora_rank")
    assert rank.applies({"freeze": "lora"}) and not rank.applies({"freeze": "bitfit"})
    assert next(p for p in peft.params if p.name == "lora_targets").choices == ("attention",)
    assert load_space("peft", fixed=["lora_modules=qkv"]).params[-1].value == "qkv"


@pytest.mark.slow
def test_adapter_at_rank_8_is_under_2_percent_of_a_vit_small(tmp_path: Path) -> None:
    torch.manual_seed(0)
    vit = models.create("vit_small_patch16_224", num_classes=10, pretrained=False)
    full = export.save_model(tmp_path / "full", vit.state_dict(), {"trial": 0}) / export.WEIGHTS
    adapters.add_lora(vit, Recipe(freeze="lora", lora_rank=8))
    export.save_model(tmp_path / "lora", {}, {"trial": 0}, adapter=(adapters.adapter_state(vit), {}))
    ratio = (tmp_path / "lora" / export.ADAPTER).stat().st_size / full.stat().st_size
    assert ratio <= 0.02, ratio


@pytest.mark.slow
def test_a_peft_search_exports_a_plain_model_and_its_adapter(tmp_path: Path) -> None:
    from conftest import make_image_folder

    folder = make_image_folder(tmp_path / "data", per_class=8, size=(16, 16))
    result = autoft.search(
        "test_vit",
        folder,
        trials=2,
        space="peft",
        space_fixed=("freeze=lora",),
        pretrained=False,
        image_size=16,
        max_epochs=2,
        export_adapter=True,
        run_dir=tmp_path / "run",
    )
    meta = json.loads((result.model_dir / export.CONFIG).read_text())
    assert meta["params"]["freeze"] == "lora" and (result.model_dir / export.ADAPTER).is_file()
    tuned = autoft.load_model(result.model_dir, device="cpu")
    assert not adapters.lora_layers(tuned.model)
    onnx_path, difference = export.export_model(result.model_dir, format="onnx")
    assert onnx_path.is_file() and difference < 1e-4
