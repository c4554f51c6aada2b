"""Tasks: what the data and the model are (images today). The search core asks for one by name.

>>> from autoft import tasks
>>> tasks.get("image").name
'image'
"""

from __future__ import annotations

from collections.abc import Callable

from autoft.errors import AutoftError, closest
from autoft.tasks.base import Dataset, Task, TensorSplit

__all__ = ["Dataset", "Task", "TensorSplit", "get", "names", "register"]

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


def _image() -> Task:
    from autoft.tasks.image import ImageTask

    return ImageTask()


register("image", _image)
