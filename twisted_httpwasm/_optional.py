"""Optional dependencies: imported when their feature is used, refused in one line when absent.

``pip install twisted-httpwasm`` installs what serving needs (Twisted and
wasmtime) and nothing more.  OpenTelemetry, prometheus_client, h2 and
treq/pyOpenSSL come with extras, and every import of one of them goes through
:func:`require`, when its feature is asked for: if the package is not
installed, the feature is refused with one line that names the
``pip install 'twisted-httpwasm[EXTRA]'`` to run (:class:`ExtraMissing`).
:func:`installed` asks without importing.

Every layer may import this module (it imports nothing of the package).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from types import ModuleType

__all__ = ["EXTRAS", "Extra", "ExtraMissing", "installed", "refusal", "require"]


@dataclass(frozen=True)
class Extra:
    """One extra of the distribution: its name, what it brings, and the modules that must be importable."""

    name: str
    what: str
    modules: tuple[str, ...]

    @property
    def pip(self) -> str:
        """The command that installs it."""
        return f"pip install 'twisted-httpwasm[{self.name}]'"


#: The extras (setup.cfg's ``extras_require``, but ``test``), by name.
EXTRAS: dict[str, Extra] = {
    extra.name: extra
    for extra in (
        Extra("otel", "OpenTelemetry", ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.http")),
        Extra("metrics", "prometheus_client", ("prometheus_client",)),
        Extra("http2", "h2", ("h2",)),
        Extra("remote", "treq and pyOpenSSL", ("treq", "OpenSSL")),
        Extra("yaml", "PyYAML", ("yaml",)),
    )
}


class ExtraMissing(ImportError):
    """A feature was asked for whose extra is not installed; ``str()`` is the one-line refusal."""

    def __init__(self, feature: str, extra: str):
        self.feature = feature
        self.extra = EXTRAS[extra]
        super().__init__(refusal(feature, extra))


def refusal(feature: str, extra: str) -> str:
    """``FEATURE needs WHAT: pip install 'twisted-httpwasm[EXTRA]'``."""
    known = EXTRAS[extra]
    return f"{feature} needs {known.what}: {known.pip}"


def _findable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        # find_spec("a.b") imports "a" and raises when it is missing (or blocked: sys.modules["a"] = None);
        # ValueError: a module in sys.modules without a __spec__.
        return False


def installed(extra: str) -> bool:
    """Whether every module of ``extra`` can be imported (nothing of it is imported but parent packages)."""
    return all(_findable(module) for module in EXTRAS[extra].modules)


def require(module: str, extra: str, feature: str) -> ModuleType:
    """``module``, imported; :class:`ExtraMissing` for ``feature`` if it (or a package it needs) is not installed.

    Only a missing module is turned into the refusal: an extra that is
    installed but fails on import for another reason raises as it would.
    """
    if extra not in EXTRAS:
        raise KeyError(f"no extra named {extra!r}")
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError:
        raise ExtraMissing(feature, extra) from None
