"""Register calm with transformers once transformers' quantizer registry is imported, without importing torch
(or transformers) when calm is imported: `import calm` then `AutoModelForCausalLM.from_pretrained(calm_folder)`
works in either import order. The registration itself is calm.hf_quantizer.register()."""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import warnings

TARGET = "transformers.quantizers.auto"


def _register() -> None:
    try:
        from calm.hf_quantizer import register

        register()
    except Exception as exc:  # transformers must stay importable for everything else
        warnings.warn(f"calm could not register its checkpoint format with transformers ({exc}); load calm "
                      f"checkpoints with calm.load", stacklevel=2)


class _RegisterAfterExec(importlib.abc.Loader):
    """Runs the real loader of transformers.quantizers.auto, then registers calm."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def __getattr__(self, name):  # get_source, is_package, ... of the real loader
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        _register()


class _TransformersFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader the other finders return for transformers.quantizers.auto."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _RegisterAfterExec(spec.loader)
        return spec


def install() -> None:
    """Register now if transformers' registry is loaded, else when it is (idempotent)."""
    if TARGET in sys.modules:
        _register()
    elif not any(isinstance(f, _TransformersFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TransformersFinder())
