"""Mirror of ``<linux/nsfs.h>``: the namespace-file ioctl ``check`` uses.

``NS_GET_USERNS`` on ``/proc/self/ns/net`` answers EPERM exactly when the network namespace's
owning user namespace is outside ours (ns_get_owner() in fs/nsfs.c): capabilities shown in
CapEff then do not count over it.
"""

from __future__ import annotations

from .ioc import _IO

NSIO = 0xB7
NS_GET_USERNS = _IO(NSIO, 0x1)
