"""Frozen-prefix cache: the activations entering the first trainable block group, computed once per search.

A partial fine-tune (``train_blocks=k``) freezes block groups ``0 .. g-1`` (``g = groups - k``; see
``blocks.block_groups``). Frozen modules run in eval mode (``models.set_train_mode``), so on deterministic
inputs (augment "none", no mixup or cutmix) the tensor entering group ``g`` is a fixed function of the example.
It is computed once, on first use, for train and val, and shared by every trial of the search that trains the
same last ``k`` groups; those trials then run only the suffix (groups ``g..``, head) each epoch.

A model that splits itself (``split_blocks(start) -> (prefix, suffix)``, two modules sharing its own; the text
encoders do, see ``tasks/text/models.py``) is cut that way. Any other is split with ``torch.fx``: it is traced with
every module that lies inside one block group (or the classifier) kept whole, so the graph is the model's top-level
code (``forward_features`` / ``forward_head``: resnet's stem and ``layer1..4``, efficientnet's ``conv_stem``/``bn1``
and ``blocks[i]``, vit's ``patch_embed``, position embedding and ``blocks[i]``). The cut goes before the first node
that touches group ``g`` and is only taken when exactly one tensor crosses it. The suffix is a ``GraphModule``
sharing the trial's own modules, so the optimizer, the train/eval modes and ``state_dict`` are the model's. Anything
else falls back to the uncached path (logged at debug level with the reason): a model fx cannot trace, top-level
code that differs between train and eval mode, several tensors crossing the cut, a stochastic or self-updating layer
in the prefix that a partial trial leaves in train mode (dropout, drop-path, normalization with running statistics
but no parameters, outside any module whose parameters are all frozen: those run in eval mode with everything in
them), or prefix + suffix not reproducing the model's own output on a probe (either kind of split).

Sequences (text) come in batches padded to their longest example; the task's ``padded_width`` of a split says how
wide its entry is (``max_length``): each batch's activations are written left-aligned and the rest zeroed (masked
out: the activations carry the attention mask, see ``tasks/text/models.py``).

Memory bounds (per search, all groups together; each entry is (train + val examples) x the activation's size x
4 bytes, fp32 so cached and uncached results agree within float tolerance):

- up to ``max_memory_bytes`` (default 1 GiB) entries are kept in memory, on the trial's device;
- past that, up to ``max_disk_bytes`` more (default 8 GiB), an entry is written to a memory-mapped file in
  ``spill_dir`` (the run directory's ``prefix_cache/``; the file is unlinked once mapped, so nothing is left
  behind and the OS pages it in and out as needed); without a ``spill_dir`` there is no spill;
- past both, that entry is not cached and its trials take the uncached path.

E.g. efficientnet_lite0 on 1,437 digits at 48 px, last 2 of 8 groups trainable: 1,437 x 112 x 3 x 3 x 4 bytes
= 5.5 MiB; at 224 px with 100,000 images it would be 1.7 GiB (on disk). MiniLM (hidden 384) on 10,000 sentences
at max_length 64: 10,000 x 64 x 385 x 4 bytes = 0.9 GiB per cut.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from timm.layers import get_notrace_functions, get_notrace_modules
from torch import fx, nn

from autoft import blocks, features
from autoft.features import autocast, model_inputs
from autoft.tasks.base import Dataset, InputSpec, ModelInputs, Task, TensorSplit

__all__ = ["PrefixCache", "Split", "split_model"]

log = logging.getLogger(__name__)

DEFAULT_MAX_MEMORY_BYTES = 2**30
DEFAULT_MAX_DISK_BYTES = 8 * 2**30
HEAD = 10**9  # group index of the classifier: after every block group


@dataclass
class Split:
    """A model cut before block group ``start``: ``prefix(x)`` -> activations, ``suffix(activations)`` -> logits."""

    start: int
    prefix: nn.Module  # an fx.GraphModule, or the model's own (split_blocks)
    suffix: nn.Module


@dataclass
class _Entry:
    train: TensorSplit
    val: TensorSplit
    where: str  # "memory" or "disk"

    @property
    def nbytes(self) -> int:
        return sum(s.images.numel() * s.images.element_size() for s in (self.train, self.val))


@dataclass
class PrefixCache:
    """Activations entering block group ``g`` of ``base_model`` for ``dataset``'s train and val, one entry per ``g``.

    >>> cache = PrefixCache(model, ds, task, spec, device=torch.device("cpu"))  # doctest: +SKIP
    >>> train, val = cache.activations(train_blocks=2)  # doctest: +SKIP
    >>> train.images.shape  # (N, C, H, W) entering the second-to-last group  # doctest: +SKIP
    torch.Size([1077, 112, 3, 3])
    """

    base_model: nn.Module
    dataset: Dataset
    task: Task
    spec: InputSpec
    device: torch.device
    spill_dir: Path | None = None
    max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES
    max_disk_bytes: int = DEFAULT_MAX_DISK_BYTES
    batch_size: int = 256
    _entries: dict[int, _Entry | str] = field(default_factory=dict, init=False, repr=False)

    def bytes_in(self, where: str) -> int:
        """Bytes the entries kept in ``"memory"`` or on ``"disk"`` hold."""
        return sum(e.nbytes for e in self._entries.values() if isinstance(e, _Entry) and e.where == where)

    def built(self, *, train_blocks: int) -> bool:
        """Whether the entry for the last ``train_blocks`` groups was already built (or refused); never builds."""
        return self._start(train_blocks) in self._entries

    def for_trial(self, model: nn.Module, *, train_blocks: int) -> tuple[nn.Module, TensorSplit, TensorSplit] | None:
        """``(suffix of model, train, val activations)`` when the last ``train_blocks`` groups' input is cached.

        ``model`` is the trial's copy of ``base_model``: the suffix runs its modules. None when not cacheable.
        """
        cached = self.activations(train_blocks=train_blocks)
        split = split_model(model, self._start(train_blocks)) if cached else None
        return (split.suffix, *cached) if isinstance(split, Split) else None

    def activations(self, *, train_blocks: int) -> tuple[TensorSplit, TensorSplit] | None:
        """``(train, val)`` activations entering the first of the last ``train_blocks`` groups; None if not cached."""
        start = self._start(train_blocks)
        if start not in self._entries:
            self._entries[start] = self._build(start)
        entry = self._entries[start]
        return (entry.train, entry.val) if isinstance(entry, _Entry) else None

    def _start(self, train_blocks: int) -> int:
        return len(blocks.block_groups(self.base_model)) - train_blocks

    def _build(self, start: int) -> _Entry | str:
        model = _eval_copy(self.base_model, self.device)
        train, val = self.dataset.train, self.dataset.val
        split = split_model(model, start)
        if not isinstance(split, str):
            probe = self.task.example_inputs(self.dataset, self.spec, device=self.device, count=2)
            split = _mismatch(model, split, probe) or split
        if isinstance(split, str):
            log.debug("prefix cache off for group %d: %s", start, split)
            return split
        example = self._forward(split.prefix, probe)[0]
        shaped = [(s, self._shape(example, s)) for s in (train, val)]
        need = sum(len(s) * math.prod(shape) for s, shape in shaped) * 4
        if self.bytes_in("memory") + need <= self.max_memory_bytes:
            where, allocate = "memory", self._in_memory
        elif self.spill_dir is not None and self.bytes_in("disk") + need <= self.max_disk_bytes:
            where, allocate = "disk", self._on_disk
        else:
            why = f"activations would take {need / 2**20:.0f} MiB, past the cache's memory and disk bounds"
            log.debug("prefix cache off for group %d: %s", start, why)
            return why
        entry = _Entry(*(self._fill(split.prefix, s, allocate(len(s), shape)) for s, shape in shaped), where)
        log.info(
            "prefix cache: group %d, %d x %s activations, %.1f MiB in %s",
            start,
            len(train) + len(val),
            tuple(shaped[0][1]),
            entry.nbytes / 2**20,
            entry.where,
        )
        return entry

    def _shape(self, example: torch.Tensor, split: object) -> torch.Size:
        """One example's entry shape: as computed, or a sequence as wide as the split is padded."""
        width = self.task.padded_width(split)
        return example.shape if width is None else torch.Size((width, *example.shape[1:]))

    def _in_memory(self, n: int, shape: torch.Size) -> torch.Tensor:
        return torch.empty((n, *shape), device=self.device)

    def _on_disk(self, n: int, shape: torch.Size) -> torch.Tensor:
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        handle, path = tempfile.mkstemp(prefix="activations-", suffix=".f32", dir=self.spill_dir)
        os.close(handle)
        mapped = torch.from_file(path, shared=True, size=n * math.prod(shape), dtype=torch.float32)
        os.unlink(path)  # the mapping keeps the data; the space is freed when the tensor is
        return mapped.view(n, *shape)

    def _fill(self, prefix: nn.Module, split: object, out: torch.Tensor) -> TensorSplit:
        for rows, inputs in model_inputs(self.task, split, self.spec, device=self.device, batch_size=self.batch_size):
            activations, rows = self._forward(prefix, inputs), rows.to(out.device)
            width = activations.shape[1]
            out[rows, :width] = activations.to(out.device)
            out[rows, width:] = 0  # a sequence batch narrower than the split: zeros after it (masked out); else empty
        # The labels go where the activations are (the trial's device, or the CPU for a spill file). Compared by
        # the tensor's own device: torch.device("cuda") != out.device (cuda:0), which once left them on the CPU.
        return TensorSplit(out, split.labels.to(out.device))

    @torch.no_grad()  # not inference_mode: the suffix's backward saves these activations as its input
    def _forward(self, prefix: nn.Module, inputs: object) -> torch.Tensor:
        with autocast(self.device):
            return prefix(inputs).float()


def split_model(model: nn.Module, start: int) -> Split | str:
    """Cut ``model`` before block group ``start``; the reason as a string when it cannot be cut exactly.

    >>> from autoft.tasks.image import models
    >>> split = split_model(models.create("test_resnet", num_classes=2, pretrained=False), 3)
    >>> [name for name, _ in split.suffix.named_children()]
    ['layer3', 'layer4', 'global_pool', 'fc']
    """
    groups = blocks.block_groups(model)
    if not 0 < start <= len(groups):  # start == len(groups): before the head (a linear probe's trainable part)
        return f"group {start} is not inside the model's {len(groups)} block groups"
    group_of = {name: i for i, names in enumerate(groups) for name in names}
    group_of |= dict.fromkeys(blocks.head_parameter_names(model), HEAD)
    if callable(getattr(model, "split_blocks", None)):
        split = model.split_blocks(start)
        split = split if isinstance(split, str) else Split(start, *split)
    else:
        split = _fx_split(model, start, group_of)
    if isinstance(split, str):
        return split
    trainable = {id(p) for name, p in model.named_parameters() if group_of[name] >= start}
    return _unsteady_module(model, split.prefix, trainable) or split


def _fx_split(model: nn.Module, start: int, group_of: dict[str, int]) -> Split | str:
    """The cut of the model's top-level code as ``torch.fx`` traces it (see the module doc)."""
    module_groups = {
        name: {group_of[f"{name}.{p}" if name else p] for p, _ in module.named_parameters() if p}
        for name, module in model.named_modules()
    }
    graphs = []
    for training in (True, False):  # top-level code that branches on self.training is baked into a graph
        was_training = model.training
        model.train(training)
        try:
            graphs.append(_Tracer(module_groups).trace(model))
        except Exception as err:  # fx fails in many ways on code it cannot trace
            return f"torch.fx cannot trace {type(model).__name__} ({type(err).__name__}: {err})"
        finally:
            model.train(was_training)
    if _signature(graphs[0]) != _signature(graphs[1]):
        return "the model's top-level forward differs between train and eval mode"
    return _cut(model, graphs[0], start, module_groups, group_of)


class _Tracer(fx.Tracer):
    """Keeps whole every module inside one block group (or the head), and timm's no-trace modules and functions."""

    def __init__(self, module_groups: dict[str, set[int]]):
        super().__init__(autowrap_functions=tuple(f for f in get_notrace_functions() if callable(f)))
        self.notrace = tuple(get_notrace_modules())
        self.module_groups = module_groups

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        one_group = len(self.module_groups.get(module_qualified_name, ())) == 1
        return bool(module_qualified_name) and (
            one_group or isinstance(m, self.notrace) or super().is_leaf_module(m, module_qualified_name)
        )


def _signature(graph: fx.Graph) -> list[tuple]:
    return [(n.op, str(n.target), str(n.args), str(n.kwargs)) for n in graph.nodes]


def _cut(
    model: nn.Module, graph: fx.Graph, start: int, module_groups: dict[str, set[int]], group_of: dict[str, int]
) -> Split | str:
    """Split ``graph`` before its first node that touches group ``start`` or later."""
    nodes = list(graph.nodes)
    groups = [
        module_groups.get(n.target, set())
        if n.op == "call_module"
        else {group_of[n.target]}
        if n.op == "get_attr" and n.target in group_of
        else set()
        for n in nodes
    ]
    cut = next((i for i, g in enumerate(groups) if any(x >= start for x in g)), None)
    if cut is None or any(x < start for x in groups[cut]):
        return f"no node of the traced graph starts block group {start}"
    before, after = nodes[:cut], set(nodes[cut:])
    # get_attr nodes (parameters) and placeholders with defaults (vit's attn_mask=None) are repeated in the suffix
    repeated = [n for n in before if n.op == "get_attr" or (n.op == "placeholder" and n.args)]
    crossing = [n for n in before if n not in repeated and any(u in after for u in n.users)]
    if len(crossing) != 1 or crossing[0].op == "placeholder":
        return f"{len(crossing)} values cross the cut before block group {start} (one computed tensor is needed)"
    prefix_graph, env = fx.Graph(), {}
    for node in before:
        env[node] = prefix_graph.node_copy(node, lambda n: env[n])
    prefix_graph.output(env[crossing[0]])
    suffix_graph = fx.Graph()
    env = {crossing[0]: suffix_graph.placeholder("activations")}
    for node in repeated:
        if any(u in after for u in node.users):
            env[node] = suffix_graph.node_copy(node, lambda n: env[n])
    for node in nodes[cut:]:
        env[node] = suffix_graph.node_copy(node, lambda n: env[n])
    prefix_module = fx.GraphModule(model, prefix_graph)
    prefix_module.graph.eliminate_dead_code()  # e.g. a get_attr only the suffix reads
    prefix_module.recompile()
    return Split(start, prefix_module, fx.GraphModule(model, suffix_graph))


def _unsteady_module(model: nn.Module, prefix: nn.Module, trainable: set[int]) -> str:
    """Why a module of ``model`` that ``prefix`` runs would not give the same output every epoch ('' if none).

    A partial trial trains the parameters ``trainable`` (ids); a module whose parameters are all frozen runs in eval
    mode with everything in it (``blocks.set_train_mode``), so dropout there is off (a transformer's embeddings and
    frozen layers): only the rest are checked.
    """
    names = {id(module): name for name, module in model.named_modules()}
    in_eval = features.in_eval_mode(model, trainable=trainable)  # str.startswith(()) is False
    for module in prefix.modules():  # the model's modules it holds (an fx.GraphModule adds containers of its own)
        name = names.get(id(module))
        if name is not None and not f"{name}.".startswith(in_eval) and (why := features.unsteady(name, module)):
            return f"in the frozen prefix, {why}"
    return ""


@torch.no_grad()
def _mismatch(model: nn.Module, split: Split, probe: ModelInputs) -> str:
    """'' when suffix(prefix(x)) equals the model's own forward on ``probe`` (eval mode, fp32)."""
    try:
        direct, via_split = model(probe), split.suffix(split.prefix(probe))
    except Exception as err:  # a graph that does not run is a split we do not take
        return f"the split model does not run ({type(err).__name__}: {err})"
    if direct.shape != via_split.shape or not torch.allclose(direct, via_split, rtol=1e-4, atol=1e-5):
        return "suffix(prefix(x)) differs from the model's forward"
    return ""


def _eval_copy(model: nn.Module, device: torch.device) -> nn.Module:
    copied = copy.deepcopy(model).to(device).eval()
    return copied.to(memory_format=torch.channels_last) if device.type == "cuda" else copied
