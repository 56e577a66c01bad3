"""Defaults of ``nn.Module`` arguments that the CLI prints as ``class_path``/``init_args``.

jsonargparse's ``lazy_instance(cls)`` makes such a default, but calls ``inspect.stack()``, which
reads the source of every frame on the stack (~0.5 s a call at import, seconds on a loaded
machine). :func:`lazy_default` builds the same object without it.
"""

from __future__ import annotations

from typing import Any

from jsonargparse import lazy_instance


def lazy_default(cls: type[Any]) -> Any:
    """``lazy_instance(cls)`` without its ``inspect.stack()``: an instance of a subclass of ``cls``
    that jsonargparse prints and resolves as ``cls()``; the class is registered in this module so
    that it pickles.

    >>> from nir_lightning.sampling import PyramidSampler
    >>> isinstance(lazy_default(PyramidSampler), PyramidSampler)
    True
    """
    base = lazy_instance.__globals__["_LazyInitBaseClass"]  # the class lazy_instance derives from
    name = f"LazyInstance_{cls.__name__}"
    lazy = globals().get(name)
    if lazy is None:
        lazy = type(name, (base, cls), {"__doc__": f"Class for lazy instances of {cls}", "__module__": __name__})
        globals()[name] = lazy
    return lazy(cls, {})
