"""Registries of methods, tasks and datasets, with entry points and did-you-mean errors.

    @register_method("lora")          class LoRA(Method): ...
    @register_task("classification")  class Classification(Task): ...
    @register_dataset("classification", "dtd")  class DTD(ClassificationDataset): ...

Built-in plugins live in `methods/` and `tasks/` (importable as peftbench.methods / peftbench.tasks).
Third-party packages register through the entry-point groups `peftbench.methods` and
`peftbench.tasks` (the entry point names a module or object to import), and a single file can be
loaded with `--plugin path/to/file.py`.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import pkgutil
import sys
from collections.abc import Iterable
from importlib.metadata import entry_points
from pathlib import Path

from peftbench.errors import UsageError

METHODS: dict[str, type] = {}
TASKS: dict[str, type] = {}
DATASETS: dict[str, dict[str, type]] = {}  # task -> dataset id -> dataset class

_loaded = False


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The closest choice to `name`, or None when nothing is close."""
    found = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return found[0] if found else None


def unknown(kind: str, name: str, choices: Iterable[str]) -> UsageError:
    """An error for an unknown name that lists the choices and the closest match."""
    choices = sorted(choices)
    hint = closest(name, choices)
    did = f" (did you mean {hint!r}?)" if hint else ""
    return UsageError(f"unknown {kind} {name!r}{did}; choices: {', '.join(choices) or 'none'}")


def register_method(name: str):
    def deco(cls):
        if name in METHODS and METHODS[name] is not cls:
            raise ValueError(f"method {name!r} is registered twice ({METHODS[name]} and {cls})")
        cls.name = name
        METHODS[name] = cls
        return cls

    return deco


def register_task(name: str):
    def deco(cls):
        cls.name = name
        TASKS[name] = cls
        DATASETS.setdefault(name, {})
        return cls

    return deco


def register_dataset(task: str, name: str):
    def deco(cls):
        cls.name = name
        DATASETS.setdefault(task, {})[name] = cls
        return cls

    return deco


def load_plugins(extra_files: Iterable[str | Path] = ()) -> None:
    """Import the built-in plugins, entry-point plugins, and any `--plugin` files."""
    global _loaded
    if not _loaded:
        _loaded = True
        for pkg_name in ("peftbench.tasks", "peftbench.methods"):
            pkg = importlib.import_module(pkg_name)
            for info in pkgutil.iter_modules(pkg.__path__):
                if not info.name.startswith("_"):
                    importlib.import_module(f"{pkg_name}.{info.name}")
        for group in ("peftbench.tasks", "peftbench.methods"):
            for ep in entry_points(group=group):
                ep.load()
    for path in extra_files:
        load_plugin_file(path)


def load_plugin_file(path: str | Path) -> None:
    """Import one Python file so that its @register_* decorators run."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"plugin file not found: {path}")
    mod_name = f"peftbench_plugin_{path.stem}"
    if mod_name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    spec.loader.exec_module(module)


def get_method(name: str) -> type:
    load_plugins()
    if name not in METHODS:
        raise unknown("method", name, METHODS)
    return METHODS[name]


def get_task(name: str) -> type:
    load_plugins()
    if name not in TASKS:
        raise unknown("task", name, TASKS)
    return TASKS[name]


def get_dataset(task: str, name: str) -> type:
    load_plugins()
    datasets = DATASETS.get(task, {})
    if name not in datasets:
        raise unknown(f"dataset for task {task!r},", name, datasets)
    return datasets[name]
