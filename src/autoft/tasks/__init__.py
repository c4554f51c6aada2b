"""Tasks: what the data and the model are (images today). The search core asks for one by name.

>>> from autoft import tasks
>>> tasks.get("image").name
'image'
"""

from __future__ import annotations

from collections.abc import Callable

from autoft.errors import AutoftError, closest
from autoft.tasks.base import Dataset, Task, TensorSplit

__all__ = ["Dataset", "Task", "TensorSplit", "get", "names", "register", "score_name"]

# Built-in tasks by name, created on first use (a task's imports, e.g. transformers, load only when it is used).
_FACTORIES: dict[str, Callable[[], Task]] = {}
_CREATED: dict[str, Task] = {}


def register(name: str, factory: Callable[[], Task]) -> None:
    """Make ``factory()`` the task called ``name`` (``--task NAME``, ``SearchConfig(task=NAME)``).

    >>> register("vectors", VectorTask)  # doctest: +SKIP
    """
    _FACTORIES[name] = factory
    _CREATED.pop(name, None)


def names() -> tuple[str, ...]:
    """The registered task names."""
    return tuple(_FACTORIES)


def get(name: str) -> Task:
    """The task called ``name``; an unknown name raises with the valid ones."""
    if name not in _FACTORIES:
        near = closest(name, _FACTORIES)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise AutoftError(f"Unknown task {name!r}.{hint} Known tasks: {', '.join(_FACTORIES)}.")
    if name not in _CREATED:
        _CREATED[name] = _FACTORIES[name]()
    return _CREATED[name]


def score_name(name: str | None) -> str:
    """What the task called ``name`` scores (``accuracy``, ``entity F1``), for labels in the CLI and the report;
    accuracy for a run that names no task (image runs made before tasks existed).

    >>> score_name("ner")
    'entity F1'
    """
    return get(name).score_name if name else "accuracy"


def _image() -> Task:
    from autoft.tasks.image import ImageTask

    return ImageTask()


def _text() -> Task:
    from autoft.tasks.text import TextTask

    return TextTask()


def _ner() -> Task:
    from autoft.tasks.text import NerTask

    return NerTask()


register("image", _image)
register("text", _text)
register("ner", _ner)
