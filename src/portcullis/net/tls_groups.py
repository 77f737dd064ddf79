"""Restrict the key-exchange groups of an `ssl.SSLContext`, which Python's ssl cannot do.

CPython offers only `set_ecdh_curve` (one curve, no X25519). We call OpenSSL's
`SSL_CTX_set1_groups_list` on the context's own `SSL_CTX`, through ctypes, in the very
libssl that CPython's `_ssl` module is linked against. This changes that one context
and nothing else in the process (LDAP, Redis or httpx contexts made elsewhere keep
OpenSSL's defaults), and it does not depend on the environment or on when OpenSSL was
first initialised, unlike an OPENSSL_CONF `Groups =` line.

The `SSL_CTX` pointer is the first field after the object header of CPython's
`PySSLContext` (unchanged since Python 3.2). Before using it we check that OpenSSL reads
the same options from it as `context.options` reports; any mismatch, a non-CPython
interpreter or a missing symbol raises `PKIError`: this module must never leave a
context with OpenSSL's wider default groups while claiming to have restricted them.
"""

from __future__ import annotations

import ctypes
import functools
import ssl
import sys
from collections.abc import Sequence
from typing import Any

from portcullis.errors import PKIError

# SSL_CTX_set1_groups_list(ctx, list) is a macro for SSL_CTX_ctrl(ctx, 92, 0, list).
_SSL_CTRL_SET_GROUPS_LIST = 92


@functools.cache
def _libssl() -> tuple[Any, Any]:
    if sys.implementation.name != "cpython":
        raise PKIError("restricting TLS key-exchange groups needs CPython "
                       f"(running {sys.implementation.name})")
    import _ssl

    try:
        # dlopen of the loaded extension returns its handle; dlsym then searches the
        # libraries it was linked with, so these are the functions `ssl` itself uses.
        library = ctypes.CDLL(_ssl.__file__)
        ctrl = library.SSL_CTX_ctrl
        get_options = library.SSL_CTX_get_options
    except (OSError, AttributeError) as exc:
        raise PKIError(f"cannot reach OpenSSL's SSL_CTX_ctrl through {_ssl.__file__} "
                       f"({exc}): the TLS key-exchange groups cannot be restricted") from None
    ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_char_p]
    ctrl.restype = ctypes.c_long
    get_options.argtypes = [ctypes.c_void_p]
    get_options.restype = ctypes.c_uint64
    return ctrl, get_options


def _ssl_ctx_pointer(context: ssl.SSLContext) -> int:
    pointer = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
    if not pointer:
        raise PKIError("the SSLContext holds no OpenSSL context")
    return pointer


def restrict_groups(context: ssl.SSLContext, groups: Sequence[str]) -> None:
    """Offer and accept only `groups` (OpenSSL names: "X25519", "P-256"...) for the
    key exchange of every connection made with `context` from now on."""
    if not groups or any(not name or ":" in name for name in groups):
        raise PKIError(f"not a list of TLS group names: {list(groups)}")
    ctrl, get_options = _libssl()
    pointer = _ssl_ctx_pointer(context)
    if get_options(pointer) != int(context.options):
        raise PKIError("this Python's SSLContext layout is not the one expected: "
                       "the TLS key-exchange groups cannot be restricted")
    names = ":".join(groups)
    if ctrl(pointer, _SSL_CTRL_SET_GROUPS_LIST, 0, names.encode("ascii")) != 1:
        raise PKIError(f"OpenSSL ({ssl.OPENSSL_VERSION}) refused the TLS groups {names}")
