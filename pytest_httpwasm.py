"""pytest fixtures for testing http-wasm guests with twisted-httpwasm (registered by the package's entry point).

Inert unless a test asks for a fixture: importing this plugin imports nothing of
twisted-httpwasm; the fixtures do, when used.

- ``httpwasm_client(guest, downstream=None, *, config=b"", execution="inline", **guest_options)``
  makes a :class:`twisted_httpwasm.testing.GuestClient`, closed after the test.
- ``httpwasm_guest(path, **options)`` loads a guest once per test session (its host calls
  traced) and hands the same one to every test that asks with the same options.

A relative guest path is looked up in the working directory, then next to the test file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

__all__ = ["httpwasm_client", "httpwasm_guest"]


def _resolver(request: pytest.FixtureRequest) -> Callable[[Any], Any]:
    here = Path(str(request.path)).parent

    def resolve(source: Any) -> Any:
        if isinstance(source, list | tuple):
            return [resolve(each) for each in source]
        if isinstance(source, str) and source.lstrip().startswith("("):
            return source  # WAT text
        if isinstance(source, str | os.PathLike):
            path = Path(source)
            if not path.is_absolute() and not path.exists() and (here / path).exists():
                return str(here / path)
            return os.fspath(source)
        return source

    return resolve


@pytest.fixture
def httpwasm_client(request: pytest.FixtureRequest) -> Iterator[Callable[..., Any]]:
    """A factory of GuestClient (same arguments); every client it made is closed after the test."""
    from twisted_httpwasm.testing import GuestClient

    resolve = _resolver(request)
    made: list[Any] = []

    def make(guest: Any, downstream: Any = None, **options: Any) -> Any:
        client = GuestClient(resolve(guest), downstream, **options)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@pytest.fixture
def httpwasm_guest(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """A loader of guests, each loaded once per session (calls traced): ``httpwasm_guest(path, **options)``."""
    from twisted_httpwasm.testing import cached_guest

    resolve = _resolver(request)

    def load(source: str | os.PathLike[str], **options: Any) -> Any:
        return cached_guest(resolve(source), **options)

    return load
