"""Give one transformers module instance a mixin's forward without replacing the module: its class
becomes a subclass of (mixin, its class), made once per pair. Its parameters, buffers, attribute names
and the code that reaches it by path stay as they were; the mixin calls super().forward when it has
nothing to add (runtime/engine/slot_prefixes.py, runtime/engine/slot_bottlenecks.py)."""
from __future__ import annotations

_MIXED: dict[tuple[type, type], type] = {}


def mix_in(module, mixin: type, **attributes) -> None:
    key = (mixin, type(module))
    if key not in _MIXED:
        _MIXED[key] = type(f"{mixin.__name__}{type(module).__name__}", key, {})
    module.__class__ = _MIXED[key]
    for name, value in attributes.items():
        setattr(module, name, value)
