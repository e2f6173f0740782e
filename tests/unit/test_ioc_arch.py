"""Which ioctl layout each ``uname -m`` gets: a wrong pick gives every ioctl a wrong number."""

from __future__ import annotations

import pytest

from vhostctl._uapi import ioc
from vhostctl._uapi.vhost import VHOST_GET_FEATURES, VHOST_SET_OWNER


@pytest.mark.parametrize(("machine", "arch"), [
    ("ppc64le", ioc.POWERPC), ("ppc64", ioc.POWERPC), ("ppc", ioc.POWERPC),
    ("powerpc", ioc.POWERPC), ("PPC64LE", ioc.POWERPC),
    ("mips64", ioc.MIPS), ("mipsel", ioc.MIPS), ("sparc64", ioc.SPARC), ("alpha", ioc.ALPHA),
    ("parisc64", ioc.PARISC),
    ("x86_64", ioc.GENERIC), ("aarch64", ioc.GENERIC), ("s390x", ioc.GENERIC),
    ("riscv64", ioc.GENERIC), ("loongarch64", ioc.GENERIC), ("", ioc.GENERIC),
])
def test_arch_for_machine(machine: str, arch: ioc.IocArch) -> None:
    assert ioc.arch_for_machine(machine) is arch


def test_ppc64le_numbers_are_powerpcs() -> None:
    """VHOST_GET_FEATURES = _IOR(0xAF, 0x00, __u64): read is 2 << 29 on powerpc (3 direction
    bits above 13 size bits), 2 << 30 on asm-generic; VHOST_SET_OWNER = _IO: none is 1 << 29."""
    ppc = ioc.arch_for_machine("ppc64le")
    assert VHOST_GET_FEATURES.for_arch(ppc) == 0x4008AF00
    assert VHOST_GET_FEATURES.for_arch(ioc.GENERIC) == 0x8008AF00
    assert VHOST_SET_OWNER.for_arch(ppc) == 0x2000AF01
    assert VHOST_SET_OWNER.for_arch(ioc.GENERIC) == 0x0000AF01
