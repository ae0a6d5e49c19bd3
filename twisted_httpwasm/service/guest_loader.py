"""The one loader of the ``--guest`` chain: at startup, at each reload, in each worker process.

:class:`GuestLoader` is made from the typed configuration (:meth:`GuestLoader.from_config`,
:class:`~twisted_httpwasm.service.config.HostConfig`): its ``guests``, in command-line
order, each a :class:`~twisted_httpwasm.service.config.GuestEntry` with the options
attached to it (``--guest-config``/``--guest-config-file``, ``--guest-sha256``,
``--guest-name``), and the :class:`GuestSettings` every guest of the chain gets.  It loads the whole chain
the same way whenever it is asked; only how a remote guest is fetched (blocking
before the reactor runs, asynchronously while it serves) and how a failure is
reported (``twistd`` exits with the reason; a reload keeps the running guests)
depend on when.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from twisted.internet import defer

from ..runtime.guest import Guest, GuestLoadError
from . import goconfig, sources, traefik
from .config import GuestEntry, GuestSettings, HostConfig
from .reload import ReloadError

__all__ = ["Fetches", "GuestLoader", "GuestSettings"]


class _Failed(Exception):
    """Guest ``path`` of the chain did not load: ``error`` (a source, configuration file or load error)."""

    def __init__(self, path: str, error: Exception, config_file: str | None = None):
        super().__init__(path, error)
        self.path = path
        self.error = error
        self.config_file = config_file


class Fetches:
    """The guest fetches of the reload that runs now; a newer reload stops them (:meth:`stop`)."""

    def __init__(self) -> None:
        self.running: set[defer.Deferred[sources.FetchedGuest]] = set()

    def stop(self) -> None:
        for fetch in list(self.running):
            fetch.cancel()  # the reload fails with CancelledError: superseded


class GuestLoader:
    """Loads the chain of ``guests`` (outermost first) with ``settings``.

    Each entry's ``config_file`` (``--guest-config-file``) is read again at each reload.
    """

    def __init__(self, guests: Sequence[GuestEntry], settings: GuestSettings):
        self.guests = tuple(guests)
        self.settings = settings
        self.fetches = Fetches()

    @classmethod
    def from_config(cls, config: HostConfig) -> GuestLoader:
        """The loader of ``config.guests`` with ``config.guest_settings``."""
        return cls(config.guests, config.guest_settings)

    def watched_files(self) -> list[str]:
        """The local files a reload reads again: every local ``--guest`` and ``--guest-config-file``."""
        local = [entry.path for entry in self.guests if not sources.is_remote(entry.path)]
        # A Traefik plugin directory: its manifest and module too.
        return [path for location in local for path in traefik.watched_paths(location)] + [
            entry.config_file for entry in self.guests if entry.config_file is not None
        ]

    # -- one guest, and the chain ---------------------------------------------------

    def load(self, index: int, guest_config: bytes, fetched: sources.FetchedGuest | None = None) -> Guest:
        """The guest of the ``index``-th ``--guest`` with ``guest_config``; raises :class:`GuestLoadError`.

        ``fetched``: the bytes of a remote guest (``https://...``).
        """
        entry, settings = self.guests[index], self.settings
        # A Traefik plugin (directory or zip) gives its module, displayName and maybe testData; others pass through.
        chosen = traefik.guest_source(entry.source_entry(), guest_config, entry.sha256, fetched)
        return Guest(
            chosen.source,
            name=chosen.name,
            config=chosen.config,
            log_level=settings.log_level,
            execution=settings.execution,
            timeout=settings.timeout,
            memory_limit=settings.memory_limit,
            max_buffer_bytes=settings.max_buffer_bytes,
            env=list(settings.env),
            mounts=list(settings.mounts),
            log_limit=settings.log_limit,
            sha256=chosen.sha256,
            max_requests=settings.max_requests,
            max_age=settings.max_age,
        )

    def _load_chain(self, fetched: Mapping[int, sources.FetchedGuest], *, reread_config: bool) -> list[Guest]:
        """Every guest, in order, with ``fetched`` bytes for the remote ones; :class:`_Failed` at the first failure.

        ``reread_config``: read each ``--guest-config-file`` again (a reload), else use what the options read.
        """
        guests = []
        for index, entry in enumerate(self.guests):
            guest_config = entry.config
            config_file = entry.config_file if reread_config else None
            if config_file is not None:
                try:
                    guest_config = goconfig.read_config_file(config_file)
                except (OSError, goconfig.ConfigError) as error:
                    raise _Failed(entry.path, error, config_file) from None
            try:
                guests.append(self.load(index, guest_config, fetched.get(index)))
            except GuestLoadError as error:
                raise _Failed(entry.path, error) from None
        return guests

    def _fetch_blocking(self) -> dict[int, sources.FetchedGuest]:
        fetched = {}
        for index, entry in enumerate(self.guests):
            if sources.is_remote(entry.path):
                try:
                    fetched[index] = sources.resolve_blocking(
                        entry.path,
                        entry.sha256,
                        self.settings.fetch_timeout,
                        max_bytes=self.settings.fetch_max_size,
                    )
                except sources.SourceError as error:
                    raise _Failed(entry.path, error) from None
        return fetched

    # -- when -------------------------------------------------------------------------

    def at_startup(self) -> list[Guest]:
        """The chain, loaded before the reactor runs (remote guests fetched blocking: nothing is served yet).

        A guest that cannot be fetched or loaded ends ``twistd``: :class:`SystemExit` with the reason, which
        ``twistd`` prints to stderr before exiting with status 1.  The log has not begun yet, so what the
        guest logged while it failed goes with the message.
        """
        try:
            return self._load_chain(self._fetch_blocking(), reread_config=False)
        except _Failed as failed:
            said = ""
            if isinstance(failed.error, GuestLoadError) and failed.error.log_lines:
                said = "\nthe guest logged:" + "".join(f"\n  {line}" for line in failed.error.log_lines)
            raise SystemExit(f"twistd httpwasm: --guest {failed.path}: {failed.error}{said}") from None

    def reload(self) -> defer.Deferred[Sequence[Guest]]:
        """The chain loaded afresh while serving (remote guests fetched again, configuration files read again).

        Fails with :class:`ReloadError` if one cannot be loaded.  Compiling and initialising run in a
        thread: the reactor goes on serving the running guests meanwhile.
        """
        return defer.ensureDeferred(self._reload())

    async def _reload(self) -> Sequence[Guest]:
        fetched: dict[int, sources.FetchedGuest] = {}
        for index, entry in enumerate(self.guests):
            if sources.is_remote(entry.path):
                fetch = sources.resolve(
                    entry.path,
                    entry.sha256,
                    self.settings.fetch_timeout,
                    max_bytes=self.settings.fetch_max_size,
                )
                self.fetches.running.add(fetch)
                try:
                    fetched[index] = await fetch
                except sources.SourceError as error:
                    raise ReloadError(f"--guest {entry.path}: {error}") from None
                finally:
                    self.fetches.running.discard(fetch)
        from twisted.internet import reactor, threads

        loaded: Sequence[Guest] = await threads.deferToThreadPool(
            reactor, reactor.getThreadPool(), self._reload_in_thread, fetched
        )
        return loaded

    def _reload_in_thread(self, fetched: Mapping[int, sources.FetchedGuest]) -> list[Guest]:
        try:
            return self._load_chain(fetched, reread_config=True)
        except _Failed as failed:
            error = failed.error
            if isinstance(error, goconfig.ConfigError):
                raise ReloadError(f"--guest {failed.path}: --guest-config-file {error}") from None
            if failed.config_file is not None:
                reason = f"cannot read it: {getattr(error, 'strerror', None) or error}"
                raise ReloadError(
                    f"--guest {failed.path}: --guest-config-file {failed.config_file}: {reason}"
                ) from None
            said = " / ".join(error.log_lines) if isinstance(error, GuestLoadError) else ""
            raise ReloadError(
                f"--guest {failed.path}: {error}" + (f" (the guest logged: {said})" if said else "")
            ) from None
