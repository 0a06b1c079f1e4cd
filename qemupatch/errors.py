"""Every error qemupatch raises, and the exit code each one means.

The exit code lives on the class, so this file is the one place that maps
errors to codes; the CLI only reads ``exc.exit_code``::

    QemupatchError                      3  (never raised itself)
     +-- UserError                      2  bad input: the user can fix it
     |    +-- UnknownRelease
     |    +-- SeriesError               corrupt patch, missing file in series
     |    +-- DirtyWorkTree
     |    +-- ChecksumMismatch
     |    +-- RebaseStateError          --continue with no rebase, etc.
     +-- Failed                         1  the input is fine, the result is not
     |    +-- Conflict                  a patch did not apply
     |    +-- CheckFailed               qemupatch check found problems
     |    +-- ReleaseRefused            a release gate failed (every reason listed)
     +-- InfraError                     3  the machine let us down
     |    +-- CommandFailed             a command exited non-zero
     |    +-- CommandTimeout            a command ran past its deadline
     |    +-- DownloadError
     +-- BootTestError                  20-24, one per boot-test stage
     +-- BuildError                     30-34: no engine, image, compile, killed,
     |                                         engine API failure

    BaseException
     +-- Terminated                     130 (SIGINT), 143 (SIGTERM): stopped on
                                        request; cleanup done, records written.
                                        Like KeyboardInterrupt it is no Exception,
                                        so no "except Exception" cleanup or
                                        wrapper can swallow or rename it.

Each error carries its context (command, exit code, log tail) so that the
message alone tells a maintainer what happened.
"""

from __future__ import annotations

from collections.abc import Sequence

EXIT_OK = 0


class QemupatchError(Exception):
    exit_code = 3


class UserError(QemupatchError):
    exit_code = 2


class UnknownRelease(UserError):
    def __init__(self, name: str, known: Sequence[str] = ()):
        hint = f"; known: {', '.join(known)}" if known else "; none imported yet"
        super().__init__(
            f"unknown upstream release '{name}'{hint} "
            f"(import it with: qemupatch upstream add {name})"
        )
        self.name = name


class SeriesError(UserError):
    pass


class DirtyWorkTree(UserError):
    def __init__(self, path: object, files: Sequence[str]):
        shown = ", ".join(files[:5]) + (" ..." if len(files) > 5 else "")
        super().__init__(
            f"work tree {path} has uncommitted changes ({shown}); "
            "commit or stash them first"
        )


class ChecksumMismatch(UserError):
    pass


class RebaseStateError(UserError):
    pass


class Failed(QemupatchError):
    exit_code = 1


class Conflict(Failed):
    pass


class CheckFailed(Failed):
    def __init__(self, message: str, results: Sequence[object] = ()):
        super().__init__(message)
        self.results = list(results)


class ReleaseRefused(Failed):
    """``qemupatch release`` said no; ``reasons`` lists every gate that failed."""

    def __init__(self, version: str, reasons: Sequence[str]):
        self.reasons = tuple(reasons)
        super().__init__(f"release {version} refused:\n" + "".join(f"  - {r}\n" for r in reasons))


class InfraError(QemupatchError):
    exit_code = 3


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


class CommandFailed(InfraError):
    def __init__(self, argv: Sequence[str], returncode: int, output: str):
        self.argv = tuple(argv)
        self.returncode = returncode
        self.output = output
        super().__init__(
            f"command failed with exit code {returncode}: {' '.join(argv)}\n"
            f"{_tail(output)}"
        )


class CommandTimeout(InfraError):
    def __init__(self, argv: Sequence[str], timeout: float, output: str):
        self.argv = tuple(argv)
        self.timeout = timeout
        self.output = output
        super().__init__(
            f"command ran past its {timeout:.0f} s deadline and was killed: "
            f"{' '.join(argv)}\n{_tail(output)}"
        )


class DownloadError(InfraError):
    pass


class BootTestError(QemupatchError):
    """A boot-test stage failed; the subclass says which stage."""

    exit_code = 20
    stage = "boot-test"


class GuestImageError(BootTestError):
    exit_code = 20
    stage = "guest-image"


class QemuStartError(BootTestError):
    exit_code = 21
    stage = "qemu"


class GuestCrash(BootTestError):
    exit_code = 22
    stage = "guest-boot"


class GuestTestFailed(BootTestError):
    exit_code = 23
    stage = "guest-tests"


class BootDeadline(BootTestError):
    exit_code = 24
    stage = "deadline"


class BuildError(QemupatchError):
    """Building QEMU or the guest module failed (on the host or in a container)."""

    exit_code = 33


class NoContainerEngine(BuildError):
    exit_code = 30


class ImageBuildFailed(BuildError):
    exit_code = 31


class CompileFailed(BuildError):
    exit_code = 32


class ContainerKilled(BuildError):
    exit_code = 33


class EngineError(BuildError):
    """The container engine's API failed (not the build inside it)."""

    exit_code = 34


class Terminated(BaseException):
    """A SIGTERM or SIGINT asked qemupatch to stop; raised in the main
    thread so that every ``finally`` runs (containers, QEMU, the podman
    service and overlay mounts go; records are written)."""

    def __init__(self, signum: int):
        import signal

        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")
