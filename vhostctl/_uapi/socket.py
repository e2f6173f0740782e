"""include/linux/socket.h and include/uapi/linux/uio.h: the structs of ``sendmmsg(2)``.

Python's ``socket`` module has ``sendmsg`` but no ``sendmmsg``; these are the x86-64 (LP64)
layouts the syscall reads (``struct user_msghdr`` is what userspace's ``struct msghdr`` is).
"""

from __future__ import annotations

import ctypes


class iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class msghdr(ctypes.Structure):
    _fields_ = [
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_int),
        ("msg_iov", ctypes.c_void_p),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_uint),
    ]


class mmsghdr(ctypes.Structure):
    _fields_ = [("msg_hdr", msghdr), ("msg_len", ctypes.c_uint)]
