"""The test helpers that shape the suite itself."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from twisted_httpwasm import Execution
from twisted_httpwasm.runtime import accel

from .support import EXECUTIONS, GUEST_PATHS, GuestPathMixin, execution_variants, guest_path_variants, make_guest


class _ExampleTestsMixin:
    def test_shared(self) -> None:
        """A test every mode runs."""


class _ThreadOnlyMixin:
    def test_thread_only(self) -> None:
        """A test the thread mode alone runs."""


class ExecutionVariantsTests(SynchronousTestCase):
    def test_one_class_per_execution_mode_named_after_the_mixin(self) -> None:
        """Each execution mode and guest-call path gets one test case class, ``{Name}{Mode}Tests`` (compiled
        accelerator) and ``{Name}{Mode}PureTests``, with ``execution`` and ``guest_path`` set, in the mixin's
        module (where pytest and trial look for it)."""
        classes = execution_variants(_ExampleTestsMixin, SynchronousTestCase, features=2)
        self.assertEqual(
            list(classes),
            ["_ExampleThreadTests", "_ExampleThreadPureTests", "_ExampleInlineTests", "_ExampleInlinePureTests"],
        )
        self.assertEqual(
            [(cls.execution, cls.guest_path) for cls in classes.values()],  # type: ignore[attr-defined]
            [(execution, path) for execution in EXECUTIONS for path in GUEST_PATHS],
        )
        for name, cls in classes.items():
            self.assertEqual((cls.__name__, cls.__qualname__, cls.__module__), (name, name, __name__))
            self.assertTrue(issubclass(cls, SynchronousTestCase))
            self.assertEqual(cls.features, 2)  # type: ignore[attr-defined]
            self.assertTrue(hasattr(cls, "test_shared"))

    def test_mode_only_tests_join_that_mode_alone(self) -> None:
        """A mixin given in ``only`` for one mode adds its tests to that mode's class only; ``name`` renames."""
        classes = execution_variants(
            _ExampleTestsMixin, SynchronousTestCase, name="Other", only={Execution.THREAD: _ThreadOnlyMixin}
        )
        self.assertTrue(hasattr(classes["OtherThreadTests"], "test_thread_only"))
        self.assertFalse(hasattr(classes["OtherInlineTests"], "test_thread_only"))


class _PathProbe(GuestPathMixin, SynchronousTestCase):
    """Records which path a guest made in the test used."""

    def probe(self) -> None:
        self.used = make_guest('(func (export "handle_request") (result i64) (i64.const 0))', NOOP).accelerated


NOOP = '(func (export "handle_response") (param i32 i32))'


class GuestPathTests(SynchronousTestCase):
    def test_the_pure_variant_loads_guests_without_the_accelerator(self) -> None:
        """``guest_path = "pure"`` makes the guests of the test pure-Python, whatever is built."""
        from twisted.trial.reporter import TestResult

        probe = type("P", (_PathProbe,), {"guest_path": "pure"})("probe")
        result = TestResult()
        probe.run(result)
        self.assertTrue(result.wasSuccessful())
        self.assertIsNone(probe.used)  # type: ignore[attr-defined]
        self.assertIs(accel.module, accel.compiled)  # restored after the test

    def test_the_accelerated_variant_uses_it_or_skips_with_the_reason(self) -> None:
        """``guest_path = "accelerated"`` uses the compiled accelerator; without one it skips, saying why."""
        from twisted.trial.reporter import TestResult

        probe = type("A", (_PathProbe,), {"guest_path": "accelerated"})("probe")
        result = TestResult()
        probe.run(result)
        if accel.compiled is None:
            self.assertEqual(len(result.skips), 1)
            self.assertIn(accel.REASON, str(result.skips[0][1]))
        else:
            self.assertTrue(result.wasSuccessful())
            self.assertEqual(result.skips, [])
            self.assertIs(probe.used, accel.compiled)  # type: ignore[attr-defined]

    def test_module_classes_get_a_twin_per_path(self) -> None:
        """``guest_path_variants`` replaces each test class of a module by one per path."""

        class FooTests(SynchronousTestCase):
            def test_x(self) -> None:
                pass

        namespace = {"__name__": FooTests.__module__, "FooTests": FooTests}
        guest_path_variants(namespace)
        self.assertEqual(sorted(namespace), ["FooPureTests", "FooTests", "__name__"])
        self.assertEqual(namespace["FooTests"].guest_path, "accelerated")
        self.assertEqual(namespace["FooPureTests"].guest_path, "pure")
        self.assertTrue(issubclass(namespace["FooPureTests"], FooTests))
