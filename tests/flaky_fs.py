"""A test filesystem that fails reads a set number of times: ``flaky://<n>/<absolute path>``.

The first ``n`` reads of a path raise ``ConnectionResetError`` (a transient ``OSError``), later
ones read the real file. The count of injected failures is kept beside the file
(``<path>.failures``) so that every process (Ray workers too) shares it and a test can assert
that the failures really happened. Registered in Ray workers through the session's
``worker_process_setup_hook`` (tests/conftest.py).
"""
from __future__ import annotations

import os

import fsspec
from fsspec.implementations.local import LocalFileSystem


def injected_failures(path: str) -> int:
    """How many failures were injected for ``path`` so far."""
    try:
        with open(path + ".failures") as handle:
            return int(handle.read() or 0)
    except FileNotFoundError:
        return 0


class FlakyFileSystem(LocalFileSystem):
    protocol = "flaky"

    @staticmethod
    def _split(path: str) -> tuple[int, str]:
        path = path.removeprefix("flaky://")
        count, _, rest = path.partition("/")
        return int(count), "/" + rest.lstrip("/")

    def _strip_protocol(self, path):  # keep the failure count in the path
        return path.removeprefix("flaky://") if isinstance(path, str) else path

    def cat_file(self, path, start=None, end=None, **kwargs):
        fails, real = self._split(path)
        done = injected_failures(real)
        if done < fails:
            with open(real + ".failures", "w") as handle:
                handle.write(str(done + 1))
            raise ConnectionResetError(f"flaky: injected failure {done + 1} of {fails}")
        return super().cat_file(real, start=start, end=end, **kwargs)

    def exists(self, path, **kwargs):
        return os.path.exists(self._split(path)[1])


def register() -> None:
    """Make ``flaky://`` known to fsspec in this process."""
    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)


register()
