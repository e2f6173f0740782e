"""Typed errors.  Every failure the library reports is a :class:`VhostctlError` (an ``OSError``
that keeps ``errno``), subclassed by the phase it happened in, so the CLI can map phases to
stable exit codes without parsing messages."""

from __future__ import annotations

import errno as _errno
import os

# Stable exit codes (documented in vhostctl(8)).
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_PERMISSION = 3
EXIT_UNSUPPORTED = 4


class VhostctlError(OSError):
    """Base class: an operation failed.  ``op`` names it, ``hint`` says what to do."""

    exit_code = EXIT_FAILURE

    def __init__(self, op: str, err: int = 0, detail: str = "", *, hint: str = "") -> None:
        super().__init__(err, os.strerror(err) if err else detail)
        self.op = op
        self.detail = detail or (os.strerror(err) if err else "")
        self.hint = hint

    def __str__(self) -> str:
        msg = f"{self.op}: {self.detail}" if self.op else self.detail
        return f"{msg} ({self.hint})" if self.hint else msg

    @property
    def code(self) -> int:
        """Exit code for the CLI: permission problems and missing support are told apart."""
        if self.errno in (_errno.EPERM, _errno.EACCES):
            return EXIT_PERMISSION
        return self.exit_code


class OpenError(VhostctlError):
    """Opening a device node failed (absent module, permissions, device cgroup)."""


class IoctlError(VhostctlError):
    """The kernel rejected an ioctl.  ``vq`` is the virtqueue index when one was involved."""

    def __init__(self, op: str, err: int, *, vq: int | None = None, hint: str = "") -> None:
        self.vq = vq
        super().__init__(op if vq is None else f"{op}(vq={vq})", err, hint=hint)


class SyscallError(VhostctlError):
    """A non-ioctl system call failed (socket, bind, mmap, memfd, eventfd ...)."""


class ValidationError(VhostctlError):
    """Bad input caught before the kernel was asked; nothing was changed."""

    exit_code = EXIT_USAGE

    def __init__(self, op: str, detail: str, *, hint: str = "") -> None:
        super().__init__(op, _errno.EINVAL, detail, hint=hint)
        self.detail = detail


class UnsupportedError(VhostctlError):
    """The running kernel does not offer what was asked (a feature bit, an ioctl)."""

    exit_code = EXIT_UNSUPPORTED

    def __init__(self, op: str, detail: str, *, hint: str = "") -> None:
        super().__init__(op, _errno.EOPNOTSUPP, detail, hint=hint)
        self.detail = detail


class WaitTimeout(VhostctlError):
    """A bounded wait on the kernel ran out (a frame that never arrived)."""

    def __init__(self, op: str, detail: str) -> None:
        super().__init__(op, _errno.ETIMEDOUT, detail)
        self.detail = detail


class IntegrityError(VhostctlError):
    """Data crossed the datapath but not intact (wrong bytes, lost or duplicated frames)."""

    def __init__(self, op: str, detail: str) -> None:
        super().__init__(op, _errno.EIO, detail)
        self.detail = detail
