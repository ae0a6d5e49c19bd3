"""The shared coerce functions of ``twistd httpwasm``'s options, and how ``usage.Options`` runs them."""

from __future__ import annotations

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from twisted_httpwasm.runtime.guest import Execution
from twisted_httpwasm.service import coercers
from twisted_httpwasm.service.tap import Options


class CoercerTests(SynchronousTestCase):
    def refused(self, coerce: object, text: str) -> str:
        with self.assertRaises(usage.UsageError) as raised:
            coerce(text)  # type: ignore[operator]
        return str(raised.exception)

    def test_size(self) -> None:
        size = coercers.size("--x")
        self.assertEqual((size("1"), size("64MiB"), size(" 2 kib ")), (1, 64 * 1024**2, 2048))
        self.assertEqual(self.refused(size, "0"), "--x: '0' is not a positive size")
        self.assertIn("--x: '64MB' is not a size", self.refused(size, "64MB"))
        unlimited = coercers.size("--x", unlimited=True)
        self.assertEqual((unlimited("0"), unlimited("None"), unlimited("1GiB")), (None, None, 1024**3))
        self.assertEqual(coercers.format_size(64 * 1024**2), "64MiB")
        self.assertEqual(coercers.format_size(1000), "1000")

    def test_seconds(self) -> None:
        positive = coercers.seconds("--t")
        self.assertEqual(positive("0.5"), 0.5)
        for text in ("0", "-1", "nan", "inf", "x"):
            self.assertEqual(self.refused(positive, text), f"--t must be a positive number of seconds, not {text!r}")
        self.assertEqual(coercers.seconds("--t", unlimited=True)("none"), None)
        self.assertIn("(or 0 or none)", self.refused(coercers.seconds("--t", unlimited=True), "-1"))
        zero = coercers.seconds("--t", zero=True)
        self.assertEqual(zero("0"), 0)
        self.assertEqual(self.refused(zero, "-1"), "--t must be a number of seconds (0 or more), not '-1'")

    def test_count_and_choice(self) -> None:
        count = coercers.count("--n", "things")
        self.assertEqual(count("3"), 3)
        self.assertEqual(self.refused(count, "0"), "--n must be a positive number of things, not '0'")
        choice = coercers.choice("--e", Execution, normalise=True)
        self.assertIs(choice(" INLINE "), Execution.INLINE)
        self.assertEqual(self.refused(choice, "fast"), "--e must be one of thread, inline, not 'fast'")

    def test_options_coerce_their_defaults_and_values(self) -> None:
        """The declared defaults are coerced like a value; a bad value is refused with the coercer's message."""
        options = Options()
        self.assertEqual((options["guest-timeout"], options["guest-memory-limit"]), (1.0, 64 * 1024**2))
        self.assertIs(options["execution"], Execution.THREAD)
        self.assertIsNone(options["guest-max-requests"])
        with self.assertRaises(usage.UsageError) as raised:
            Options().parseOptions(["--max-buffer-bytes", "lots"])
        self.assertIn("--max-buffer-bytes: 'lots' is not a size", str(raised.exception))
