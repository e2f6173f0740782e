"""The kernel's ioctl number encoding, ``_IOC`` and friends, for every Linux architecture.

An ioctl number packs (direction, type, nr, size).  Field widths and the direction bits
differ per architecture, so numbers are always derived here, never pasted as hex:

- ``include/uapi/asm-generic/ioctl.h``: NRBITS 8, TYPEBITS 8, SIZEBITS 14, DIRBITS 2,
  NONE 0, WRITE 1, READ 2 (x86, arm, arm64, riscv, s390, loongarch, ...).
- ``arch/{powerpc,mips,sparc,alpha}/include/uapi/asm/ioctl.h``: SIZEBITS 13, DIRBITS 3,
  NONE 1, READ 2, WRITE 4.
- ``arch/parisc/include/uapi/asm/ioctl.h``: generic widths, but WRITE 2 and READ 1.

Each helper returns an :class:`Ioctl`, an ``int`` (the native number, usable with
``fcntl.ioctl`` directly) that remembers its parts so it can be re-encoded for another
architecture with :meth:`Ioctl.for_arch`.
"""

from __future__ import annotations

import ctypes
import platform
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "ARCHES",
    "NATIVE",
    "_IO",
    "_IOC",
    "_IOR",
    "_IOW",
    "_IOWR",
    "IocArch",
    "Ioctl",
    "arch_for_machine",
    "ioc_decode",
]


@dataclass(frozen=True)
class IocArch:
    """Bit layout of ioctl numbers on one architecture family."""

    name: str
    sizebits: int
    dirbits: int
    none: int
    read: int
    write: int
    nrbits: int = 8
    typebits: int = 8

    @property
    def nrshift(self) -> int:
        return 0

    @property
    def typeshift(self) -> int:
        return self.nrshift + self.nrbits

    @property
    def sizeshift(self) -> int:
        return self.typeshift + self.typebits

    @property
    def dirshift(self) -> int:
        return self.sizeshift + self.sizebits


GENERIC = IocArch("generic", sizebits=14, dirbits=2, none=0, write=1, read=2)
POWERPC = IocArch("powerpc", sizebits=13, dirbits=3, none=1, read=2, write=4)
MIPS = IocArch("mips", sizebits=13, dirbits=3, none=1, read=2, write=4)
SPARC = IocArch("sparc", sizebits=13, dirbits=3, none=1, read=2, write=4)
ALPHA = IocArch("alpha", sizebits=13, dirbits=3, none=1, read=2, write=4)
PARISC = IocArch("parisc", sizebits=14, dirbits=2, none=0, write=2, read=1)

ARCHES: dict[str, IocArch] = {a.name: a for a in (GENERIC, POWERPC, MIPS, SPARC, ALPHA, PARISC)}

# Direction symbols used by the definitions; mapped to each arch's bits at encode time.
NONE, WRITE, READ = "none", "write", "read"


def arch_for_machine(machine: str) -> IocArch:
    """Pick the ioctl layout for a ``uname -m`` string; anything unlisted is asm-generic."""
    m = machine.lower()
    for prefix, arch in (
        ("ppc", POWERPC),
        ("powerpc", POWERPC),
        ("mips", MIPS),
        ("sparc", SPARC),
        ("alpha", ALPHA),
        ("parisc", PARISC),
    ):
        if m.startswith(prefix):
            return arch
    return GENERIC


NATIVE = arch_for_machine(platform.machine())


def _encode(arch: IocArch, direction: str, typ: int, nr: int, size: int) -> int:
    bits = {NONE: arch.none, READ: arch.read, WRITE: arch.write, "rw": arch.read | arch.write}
    if not 0 <= typ < (1 << arch.typebits) or not 0 <= nr < (1 << arch.nrbits):
        raise ValueError(f"ioctl type {typ:#x} / nr {nr:#x} out of range")
    if not 0 <= size < (1 << arch.sizebits):
        raise ValueError(f"ioctl size {size} does not fit {arch.sizebits} bits on {arch.name}")
    return (
        (bits[direction] << arch.dirshift)
        | (typ << arch.typeshift)
        | (nr << arch.nrshift)
        | (size << arch.sizeshift)
    )


class Ioctl(int):
    """An ioctl request number that remembers how it was built."""

    direction: str
    type: int
    nr: int
    size: int

    def __new__(cls, direction: str, typ: int, nr: int, size: int) -> Ioctl:
        self = super().__new__(cls, _encode(NATIVE, direction, typ, nr, size))
        self.direction, self.type, self.nr, self.size = direction, typ, nr, size
        return self

    def for_arch(self, arch: IocArch | str) -> int:
        """The number this definition has on another architecture."""
        a = ARCHES[arch] if isinstance(arch, str) else arch
        return _encode(a, self.direction, self.type, self.nr, self.size)

    def __reduce__(self) -> tuple[Callable[..., Ioctl], tuple[str, int, int, int]]:
        # keep pickling/copying an Ioctl an Ioctl
        return (Ioctl, (self.direction, self.type, self.nr, self.size))


def _sizeof(t: type | int) -> int:
    # The C macros take a type and apply sizeof(); we accept a ctypes type or a byte count.
    return t if isinstance(t, int) else ctypes.sizeof(t)


def _IOC(direction: str, typ: int, nr: int, size: int) -> Ioctl:
    return Ioctl(direction, typ, nr, size)


def _IO(typ: int, nr: int) -> Ioctl:
    return Ioctl(NONE, typ, nr, 0)


def _IOR(typ: int, nr: int, t: type | int) -> Ioctl:
    return Ioctl(READ, typ, nr, _sizeof(t))


def _IOW(typ: int, nr: int, t: type | int) -> Ioctl:
    return Ioctl(WRITE, typ, nr, _sizeof(t))


def _IOWR(typ: int, nr: int, t: type | int) -> Ioctl:
    return Ioctl("rw", typ, nr, _sizeof(t))


def ioc_decode(number: int, arch: IocArch | str = NATIVE) -> tuple[str, int, int, int]:
    """Split a request number into (direction, type, nr, size) for ``arch``."""
    a = ARCHES[arch] if isinstance(arch, str) else arch
    d = (number >> a.dirshift) & ((1 << a.dirbits) - 1)
    names = {a.none: NONE, a.read: READ, a.write: WRITE, a.read | a.write: "rw"}
    if d not in names:
        raise ValueError(f"direction bits {d:#x} are not valid on {a.name}")
    return (
        names[d],
        (number >> a.typeshift) & ((1 << a.typebits) - 1),
        (number >> a.nrshift) & ((1 << a.nrbits) - 1),
        (number >> a.sizeshift) & ((1 << a.sizebits) - 1),
    )


def collect_ioctls(namespace: dict[str, object]) -> dict[int, str]:
    """Map request number -> C name for every :class:`Ioctl` in a header module's globals."""
    return {int(v): k for k, v in namespace.items() if isinstance(v, Ioctl) and k.isupper()}
