"""nftables through libnftables in-process (ctypes on libnftables.so.1).

Commands are written in nft's own syntax (libnftables 1.0.6 mishandles some JSON input);
state is read back with the JSON output flag. One `run` call is one atomic transaction.
"""

from __future__ import annotations

import ctypes
import json
from typing import Any

from netstack.errors import KernelError

_NFT_CTX_DEFAULT = 0
_NFT_CTX_OUTPUT_HANDLE = 1 << 3
_NFT_CTX_OUTPUT_JSON = 1 << 4


class Nftables:
    """One libnftables context for this process's network namespace."""

    _lib: ctypes.CDLL | None = None

    def __init__(self) -> None:
        lib = self._load()
        self._ctx = lib.nft_ctx_new(_NFT_CTX_DEFAULT)
        lib.nft_ctx_buffer_output(self._ctx)
        lib.nft_ctx_buffer_error(self._ctx)

    @classmethod
    def _load(cls) -> ctypes.CDLL:
        if cls._lib is None:
            try:
                lib = ctypes.CDLL("libnftables.so.1")
            except OSError:
                raise KernelError(
                    "libnftables.so.1 not found; install it (apt-get install libnftables1)"
                ) from None
            lib.nft_ctx_new.restype = ctypes.c_void_p
            lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
            lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
            lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
            lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
            lib.nft_ctx_output_get_flags.restype = ctypes.c_uint
            lib.nft_ctx_output_get_flags.argtypes = [ctypes.c_void_p]
            lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
            lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
            cls._lib = lib
        return cls._lib

    def close(self) -> None:
        if self._ctx:
            self._load().nft_ctx_free(self._ctx)
            self._ctx = None

    def run(self, commands: str, *, json_output: bool = False) -> str:
        """Run commands (nft syntax, newline separated) as one atomic transaction.

        Raises KernelError carrying nft's own error text.
        """
        lib = self._load()
        flags = _NFT_CTX_OUTPUT_JSON | _NFT_CTX_OUTPUT_HANDLE if json_output else 0
        lib.nft_ctx_output_set_flags(self._ctx, flags)
        rc = lib.nft_run_cmd_from_buffer(self._ctx, commands.encode())
        output = (lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode()
        error = (lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode()
        if rc != 0:
            first = error.strip().splitlines()[0] if error.strip() else "unknown error"
            raise KernelError(f"nftables transaction failed: {first}")
        return output

    def list_json(self, what: str) -> list[dict[str, Any]]:
        """`list <what>` parsed: the `nftables` array of nft's JSON output, or [] if absent."""
        try:
            text = self.run(f"list {what}", json_output=True)
        except KernelError:
            return []
        if not text.strip():
            return []
        items: list[dict[str, Any]] = json.loads(text).get("nftables", [])
        return items
