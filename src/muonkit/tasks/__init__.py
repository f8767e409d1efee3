"""Benchmark tasks for `muonkit bench`: models, data, the training loop, reports.

Each task module holds one Task subclass; TASKS maps the command-line name to an instance.
"""

from __future__ import annotations

from muonkit.tasks.base import DataOptions, Task, TaskError
from muonkit.tasks.charlm import CharLM
from muonkit.tasks.cifar10 import CIFAR10
from muonkit.tasks.fashion_mnist import FashionMNIST
from muonkit.tasks.hflm import HFLM
from muonkit.tasks.modular import Modular
from muonkit.tasks.regression import Regression

TASKS: dict[str, Task] = {task.name: task for task in (CharLM(), HFLM(), FashionMNIST(), CIFAR10(), Modular(), Regression())}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}")
    return TASKS[name]


__all__ = ["TASKS", "DataOptions", "Task", "TaskError", "get_task"]
