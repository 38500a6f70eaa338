"""A researcher's own code, loaded by name: the modules a `plugins` parameter names register checkers
(`evaluation.register_checker`), steering methods (`methods.register`) and model layouts
(`architectures.register_architecture`) when they are imported, so the notebooks, the pipeline and the report use them
without an edit of `saif_utils`."""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType


class PluginError(ImportError):
    """A plugin module could not be imported; the message names it and the import error."""


def plugin_names(plugins: str | Sequence[str] | None) -> list[str]:
    """The `plugins` parameter as a list: None, one name, a comma-separated string or a list of names."""
    if plugins is None:
        return []
    if isinstance(plugins, str):
        return [name.strip() for name in plugins.split(",") if name.strip()]
    if not (isinstance(plugins, (list, tuple)) and all(isinstance(name, str) for name in plugins)):
        raise TypeError(f"plugins={plugins!r}: give a module name, a path to a .py file, or a list of them")
    return list(plugins)


def load_plugins(plugins: str | Sequence[str] | None) -> list[ModuleType]:
    """Import each plugin — an importable module name (`my_lab.saif_ext`) or a path to a `.py` file — once per process,
    and return the modules. A module that does not import fails naming it and the error."""
    return [_load(name) for name in plugin_names(plugins)]


def _load(name: str) -> ModuleType:
    is_file = name.endswith(".py") or "/" in name
    try:
        if not is_file:
            return importlib.import_module(name)
        path = Path(name).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
        # One module per file path: a notebook rerun in the same kernel imports it once, so nothing registers twice.
        module_name = f"saif_plugin_{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
        if module_name in sys.modules:
            return sys.modules[module_name]
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[module_name]
            raise
        return module
    except Exception as err:
        raise PluginError(f"plugins: {name!r} does not import — {type(err).__name__}: {err}") from err


def plugin_argument(plugins: str | Sequence[str] | None) -> list[str] | None:
    """The plugins as notebooks receive them: file paths made absolute (kernels run in the repository root)."""
    names = plugin_names(plugins)
    if not names:
        return None
    return [str(Path(n).expanduser().resolve()) if n.endswith(".py") or "/" in n else n for n in names]
