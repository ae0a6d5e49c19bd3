"""twisted_httpwasm._optional: an extra imported on use; "not installed" is a one-line refusal."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from twisted_httpwasm import _optional
from twisted_httpwasm.web import metrics, tracing


class OptionalTests(SynchronousTestCase):
    def setUp(self) -> None:
        # An extra whose module is a dotted name under a package that does not exist: find_spec raises for it.
        fake = _optional.Extra("fake", "the fake package", ("no_such_package_httpwasm.sub",))
        self.patch(_optional, "EXTRAS", {**_optional.EXTRAS, "fake": fake})

    def test_installed_is_false_for_a_dotted_name_whose_parent_is_missing(self) -> None:
        """find_spec("a.b") raises ModuleNotFoundError when "a" is missing: installed() says False."""
        self.assertFalse(_optional.installed("fake"))

    def test_require_refuses_in_one_line_with_the_pip_command(self) -> None:
        """A missing module is ExtraMissing (an ImportError) whose text is the one-line refusal."""
        error = self.assertRaises(
            _optional.ExtraMissing, _optional.require, "no_such_package_httpwasm.sub", "fake", "--fake"
        )
        self.assertIsInstance(error, ImportError)
        self.assertEqual(str(error), "--fake needs the fake package: pip install 'twisted-httpwasm[fake]'")
        self.assertIsNone(error.__cause__)

    def test_require_returns_an_installed_module(self) -> None:
        """An installed module is imported and returned."""
        self.assertEqual(_optional.require("json", "fake", "--fake").__name__, "json")

    def test_the_extras_are_those_of_setup_cfg(self) -> None:
        """Each extra named here is one that setup.cfg defines, so that its pip line installs something."""
        import configparser
        from pathlib import Path

        setup = configparser.ConfigParser()
        setup.read(Path(__file__).resolve().parent.parent / "setup.cfg")
        defined = set(setup["options.extras_require"])
        self.assertLessEqual({"otel", "metrics", "http2", "remote"}, defined)
        self.assertLessEqual(set(_optional.EXTRAS) - {"fake"}, defined)

    def test_the_option_refusals(self) -> None:
        """--otel and --metrics are refused with their extras' pip lines."""
        self.assertEqual(tracing.INSTALL_HINT, "--otel needs OpenTelemetry: pip install 'twisted-httpwasm[otel]'")
        self.assertEqual(
            metrics.INSTALL_HINT, "--metrics needs prometheus_client: pip install 'twisted-httpwasm[metrics]'"
        )
