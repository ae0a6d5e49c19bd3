"""The public facade: what ``twisted_httpwasm`` exports, and nothing private leaks into it."""

from __future__ import annotations

import importlib
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

import twisted_httpwasm

PUBLIC_MODULES = (
    "abi",
    "runtime.guest",
    "web.resource",
    "web.proxy",
    "web.wsgi",
    "web.site",
    "web.drain",
    "web.metrics",
    "web.tracing",
    "web.access_log",
    "service.tap",
    "testing",
)


class PublicApiTests(SynchronousTestCase):
    def test_every_exported_name_exists(self):
        """Each name in ``__all__`` of the package and its public modules is really there."""
        for module in [twisted_httpwasm, *(importlib.import_module(f"twisted_httpwasm.{m}") for m in PUBLIC_MODULES)]:
            for name in module.__all__:
                self.assertTrue(hasattr(module, name), f"{module.__name__}.{name}")

    def test_the_facade_is_what_users_need(self):
        """The package exports the names the README and docs/configuration.md use, no more, no less."""
        self.assertEqual(
            sorted(twisted_httpwasm.__all__),
            [
                "BodyKind",
                "DrainService",
                "Execution",
                "FailurePolicy",
                "Feature",
                "Guest",
                "GuestLoadError",
                "GuestMetrics",
                "GuestResource",
                "GuestSite",
                "GuestTracing",
                "GuestTrap",
                "HeaderKind",
                "LogLevel",
                "LogLimit",
                "Mount",
                "ProxyResource",
                "RequestLog",
                "UnderscoreHeaderGuard",
            ],
        )

    def test_the_test_kit(self):
        """twisted_httpwasm.testing exports what docs/testing.md uses; the facade does not import it."""
        testing = importlib.import_module("twisted_httpwasm.testing")
        self.assertEqual(
            sorted(testing.__all__),
            [
                "DownstreamRequest",
                "Exchange",
                "GuestClient",
                "GuestSource",
                "GuestTestMixin",
                "Headers",
                "HostCall",
                "cached_guest",
                "init_calls",
                "load_guest",
            ],
        )
        probe = "import sys, twisted_httpwasm; print('twisted_httpwasm.testing' in sys.modules)"
        output = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
        self.assertEqual(output.strip(), "False")

    def test_nothing_private_is_exported(self):
        self.assertEqual([name for name in twisted_httpwasm.__all__ if name.startswith("_")], [])

    def test_the_facade_needs_no_extra(self):
        """Importing the package (metrics and tracing names included) loads neither prometheus_client
        nor OpenTelemetry: they are optional extras, imported when metrics or traces are turned on."""
        probe = (
            "import sys, twisted_httpwasm; "
            "extras = ('prometheus_client', 'opentelemetry'); "
            "print(sorted({m.split('.')[0] for m in sys.modules if m.startswith(extras)}))"
        )
        output = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
        self.assertEqual(output.strip(), "[]")
