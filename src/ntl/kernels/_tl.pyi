# Type-checker-only view of ``triton.language`` (see ``_triton.py``): kernel bodies are Triton's
# DSL, which Triton's own annotations do not describe, so every name is dynamic and
# ``tl.constexpr`` (a compile-time parameter) is ``Any``.
from typing import Any

constexpr = Any

def __getattr__(name: str) -> Any: ...
