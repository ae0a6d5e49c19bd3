"""The test helpers that shape the suite itself."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from twisted_httpwasm import Execution

from .support import EXECUTIONS, execution_variants


class _ExampleTestsMixin:
    def test_shared(self) -> None:
        """A test every mode runs."""


class _ThreadOnlyMixin:
    def test_thread_only(self) -> None:
        """A test the thread mode alone runs."""


class ExecutionVariantsTests(SynchronousTestCase):
    def test_one_class_per_execution_mode_named_after_the_mixin(self) -> None:
        """Each execution mode gets one test case class, ``{Name}{Mode}Tests``, with ``execution`` set,
        in the mixin's module (where pytest and trial look for it)."""
        classes = execution_variants(_ExampleTestsMixin, SynchronousTestCase, features=2)
        self.assertEqual(list(classes), ["_ExampleThreadTests", "_ExampleInlineTests"])
        self.assertEqual([cls.execution for cls in classes.values()], list(EXECUTIONS))  # type: ignore[attr-defined]
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
