"""An optional record of the host functions a guest calls, for tests (``twisted_httpwasm.testing``).

Off by default, at no cost on the request path: only a guest loaded with
``on_host_call`` links its host functions through :func:`traced`, which tells
the hook before each call; every other guest links the implementations
themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["HostCallHook", "traced"]

#: Told of each host function call: the calling instance (``instance.state`` is the request's state,
#: None during init) and the function's name.  Runs on the thread of the guest call; must not raise.
HostCallHook = Callable[[Any, str], None]


def traced(name: str, implementation: Callable[..., int | None], hook: HostCallHook) -> Callable[..., int | None]:
    """``implementation`` of host function ``name``, telling ``hook`` of each call first."""

    def host_function(ctx: Any, *args: int) -> int | None:
        hook(ctx, name)
        return implementation(ctx, *args)

    host_function.__name__ = name
    return host_function
