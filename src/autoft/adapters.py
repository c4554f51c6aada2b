"""Parameter-efficient fine-tuning: LoRA adapters (the ``peft`` library), BitFit and norm-only, as freeze modes.

Each mode is a *policy*: it receives a model whose parameters all train and decides what keeps training (the head
always does). A trial applies it where it applies any freezing (:func:`policy`; registered custom pieces are
policies too), and trains through the same loop.

- ``bitfit``: the biases and the head (Ben Zaken et al. 2022);
- ``norm``: the normalization layers' parameters and the head;
- ``lora``: low-rank updates ``W + (alpha / r) B A`` on the layers :func:`lora_targets` picks, and the head (Hu et al.
  2021); ``lora_bias``: the same plus every bias.

What leaves a trial is always a *plain* model (:func:`plain_state`: the LoRA updates merged into the base weights,
under the base model's key names), so best/, soups, refits, ``load_model`` and ONNX never meet peft and inference
costs nothing extra. The adapter alone (:func:`adapter_state`: the parameters the policy trained) can also be
written beside it (``--export-adapter``), stamped with the base model's name and :func:`weights_hash`.
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from autoft import blocks, pieces
from autoft.errors import AutoftError
from autoft.recipe import LORA_MODES, PEFT_MODES, Recipe

if TYPE_CHECKING:
    from peft.tuners.lora import LoraLayer

__all__ = [
    "ADAPTER_NAME",
    "Policy",
    "adapter_state",
    "lora_layers",
    "lora_targets",
    "plain_state",
    "policy",
    "to_host",
    "weights_hash",
]

Policy = Callable[[nn.Module, Recipe], None]
ADAPTER_NAME = "default"  # peft's name for the one adapter a trial adds

# A Linear layer's role, from the names of the modules it sits in (timm: blocks.3.attn.qkv, mlp.fc1; Swin: the
# same; BERT family: attention.self.query, attention.output.dense, intermediate.dense, output.dense). Attention is
# checked first, so BERT's attention.output.dense is attention, not MLP.
_ATTENTION = re.compile(r"attn|attention")
_MLP = re.compile(r"mlp|ffn|feed_?forward|intermediate|^output$")


def policy(recipe: Recipe) -> Policy | None:
    """The function that chooses what trains for ``recipe.freeze``, or None when block counts decide (full,
    partial, linear probe, LP-FT). Built-in parameter-efficient modes and registered freeze pieces alike.

    >>> policy(Recipe(freeze="bitfit")) is train_biases, policy(Recipe(freeze="full"))
    (True, None)
    """
    if recipe.freeze in PEFT_MODES:
        return _POLICIES[recipe.freeze]
    piece = pieces.get("freeze", recipe.freeze)
    return piece.fn if piece is not None else None


def train_biases(model: nn.Module, recipe: Recipe) -> None:
    """BitFit: only the biases and the head train."""
    chosen = {name for name, _ in model.named_parameters() if name.endswith("bias")}
    _train_only(model, chosen, what="bias", mode=recipe.freeze)


def train_norms(model: nn.Module, recipe: Recipe) -> None:
    """Only the normalization layers' own parameters (scale, shift) and the head train."""
    chosen = {
        f"{module_name}.{name}" if module_name else name
        for module_name, module in model.named_modules()
        if _is_norm(module)
        for name, _ in module.named_parameters(recurse=False)
    }
    _train_only(model, chosen, what="normalization layer", mode=recipe.freeze)


def add_lora(model: nn.Module, recipe: Recipe) -> None:
    """Inject LoRA into ``model`` (in place, once) on :func:`lora_targets`; the adapters and the head train
    (``lora_bias``: every bias too)."""
    if not lora_layers(model):
        from peft import LoraConfig, inject_adapter_in_model  # imported here: only LoRA trials pay for peft

        config = LoraConfig(
            r=recipe.lora_rank,
            lora_alpha=recipe.lora_alpha,
            lora_dropout=recipe.lora_dropout,
            target_modules=lora_targets(model, recipe),
            bias="none",
        )
        inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    chosen = {name for name, _ in model.named_parameters() if ".lora_" in name}
    if recipe.freeze == "lora_bias":
        chosen |= {name for name, _ in model.named_parameters() if name.endswith("bias")}
    _train_only(model, chosen, what="LoRA", mode=recipe.freeze)


def lora_targets(model: nn.Module, recipe: Recipe) -> list[str]:
    """Full names of the modules LoRA adapts in ``model``, found by module type and name (no per-model tables).

    ``recipe.lora_modules`` (comma-separated names or name suffixes, e.g. ``"qkv,fc1"``) overrides the choice.
    Otherwise ``lora_targets`` picks Linear layers by role: ``attention`` (timm ``attn.qkv``/``attn.proj``,
    BERT ``query``/``key``/``value``/``attention.output.dense``) or ``attention+mlp`` (also timm ``mlp.fc1``/
    ``fc2``, BERT ``intermediate``/``output``). A model with none of the asked kind takes the nearest it has:
    attention -> MLP (ConvNeXt) -> every non-grouped convolution (CNNs). The head is never adapted.

    >>> lora_targets(create("test_vit", num_classes=2, pretrained=False), Recipe(freeze="lora"))[:2]
    ... # doctest: +SKIP
    ['blocks.0.attn.qkv', 'blocks.0.attn.proj']
    """
    head = {id(m) for m in blocks.classifier(model).modules()}
    adaptable = [(n, m) for n, m in model.named_modules() if id(m) not in head and _adaptable(m)]
    if recipe.lora_modules:
        wanted = [w.strip() for w in recipe.lora_modules.split(",") if w.strip()]
        found = [n for n, _ in adaptable if any(n == w or n.endswith(f".{w}") for w in wanted)]
        if not found:
            raise AutoftError(
                f"lora_modules={recipe.lora_modules!r} names no Linear or convolution layer of model "
                f"{blocks.model_name(model)}; its adaptable layers include: {', '.join(n for n, _ in adaptable[:6])}."
            )
        return found
    linear = [(n, _role(n)) for n, m in adaptable if isinstance(m, nn.Linear)]
    roles = ("attention",) if recipe.lora_targets == "attention" else ("attention", "mlp")
    for kinds in (roles, ("attention", "mlp")):
        found = [n for n, role in linear if role in kinds]
        if found:
            return found
    found = [n for n, m in adaptable if isinstance(m, nn.Conv2d)]
    if not found:
        raise AutoftError(
            f"Model {blocks.model_name(model)} has no layer LoRA can adapt (no attention or MLP Linear layer, no "
            "convolution); name some with lora_modules, or choose another freeze mode."
        )
    return found


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """The LoRA-adapted modules of ``model`` by name (empty for a model without adapters, or without peft)."""
    if "peft" not in sys.modules:  # only peft injects LoRA layers; importing it just to find none costs seconds
        return {}
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return {}
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy on the CPU of ``model``'s weights as the plain base model holds them: every LoRA update merged into
    its layer's weight, the base model's key names (no ``base_layer``, no ``lora_*``). Without LoRA: the state.

    >>> plain_state(model).keys() == create("test_vit", num_classes=2).state_dict().keys()  # doctest: +SKIP
    True
    """
    layers = lora_layers(model)
    adapters = tuple(f"{name}.lora_" for name in layers)
    bases = {f"{name}.base_layer.": f"{name}." for name in layers}
    state = {}
    for key, value in model.state_dict().items():
        if adapters and key.startswith(adapters):
            continue
        base = key[: key.rfind(".") + 1]  # "blocks.0.attn.qkv.base_layer." for "...base_layer.weight"
        state[bases.get(base, base) + key[len(base) :]] = value.detach()
    with torch.no_grad():
        for name, layer in layers.items():
            state[f"{name}.weight"] = layer.get_base_layer().weight + layer.get_delta_weight(ADAPTER_NAME)
    return to_host(state)


def to_host(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies on the CPU of ``tensors``. From a CUDA device every copy is queued at once (into pinned memory,
    ``non_blocking``) and one synchronisation ends them all: a copy per tensor, each waiting for the device, cost
    an H200 ~10 % of a resnet50 trial (320 waits per improving epoch; ``benchmarks/gpu_profile.py``).

    >>> to_host({"w": torch.ones(2)})["w"].device
    device(type='cpu')
    """
    queued = {k: v.detach().to("cpu", non_blocking=v.is_cuda, copy=True) for k, v in tensors.items()}
    if any(v.is_cuda for v in tensors.values()):
        torch.cuda.synchronize()  # the queued copies have landed before anyone reads them
    return queued


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy on the CPU of what the policy trained (LoRA's A and B, biases or norms, the head), by peft's names."""
    return to_host({k: p for k, p in model.named_parameters() if p.requires_grad})


def weights_hash(model: nn.Module) -> str:
    """SHA-256 of the backbone's weights (head excluded: the adapter carries its own), in key order: which base
    weights an adapter applies to.

    >>> len(weights_hash(nn.Linear(2, 2)))  # doctest: +SKIP
    64
    """
    head = blocks.head_parameter_names(model)
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        if key in head:
            continue
        tensor = value.detach().to("cpu").contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def is_lora(recipe: Recipe) -> bool:
    """Whether the recipe adds LoRA adapters."""
    return recipe.freeze in LORA_MODES


def _train_only(model: nn.Module, chosen: set[str], *, what: str, mode: str) -> None:
    if not chosen:
        raise AutoftError(
            f"Model {blocks.model_name(model)} has no {what} parameters for freeze={mode} to train; "
            "choose another freeze mode."
        )
    head = blocks.head_parameter_names(model)
    for name, param in model.named_parameters():
        param.requires_grad_(name in chosen or name in head)


def _is_norm(module: nn.Module) -> bool:
    """Normalization layers of torch, timm and transformers (BatchNorm, LayerNorm, GroupNorm, RMSNorm, ...)."""
    norms = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm)
    return isinstance(module, norms) or "norm" in type(module).__name__.lower()


def _adaptable(module: nn.Module) -> bool:
    """Layers peft's LoRA adapts and that are worth it: Linear, and convolutions that are not grouped (depthwise)."""
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


def _role(name: str) -> str | None:
    parts = name.split(".")
    if any(_ATTENTION.search(p) for p in parts):
        return "attention"
    if any(_MLP.search(p) for p in parts):
        return "mlp"
    return None


_POLICIES: dict[str, Policy] = {"bitfit": train_biases, "norm": train_norms, "lora": add_lora, "lora_bias": add_lora}
