"""A Zarr store on local disk whose every write survives a kill or a power cut at any moment."""

from __future__ import annotations

import asyncio
from pathlib import Path

import zarr
from zarr.core.buffer import Buffer
from zarr.core.common import AccessModeLiteral
from zarr.storage import LocalStore

from pipeline.io import write_bytes_durable


class DurableLocalStore(LocalStore):
    """A Zarr ``LocalStore`` whose writes survive a SIGKILL or a power cut at any moment.

    zarr 3.1's ``LocalStore`` already writes through a temp file and a rename, so a killed
    process leaves whole files; but it never fsyncs (a power cut can leave an empty or torn file
    under the final name) and its temp files are not ones we can recognise. Here every write,
    chunk or shard or ``zarr.json``, goes through :func:`~pipeline.io.write_bytes_durable`.
    """

    async def set(self, key: str, value: Buffer) -> None:
        """Write ``value`` under ``key``, replacing any earlier value in one step."""
        await self._set_durably(key, value, exclusive=False)

    async def set_if_not_exists(self, key: str, value: Buffer) -> None:
        """Write ``value`` under ``key`` unless the key already exists."""
        try:
            await self._set_durably(key, value, exclusive=True)
        except FileExistsError:
            pass

    def set_sync(self, key: str, value: Buffer) -> None:
        """Synchronous :meth:`set`."""
        self._ensure_open_sync()
        self._check_value(value)
        write_bytes_durable(self.root / key, value.as_buffer_like())

    async def _set_durably(self, key: str, value: Buffer, exclusive: bool) -> None:
        if not self._is_open:
            await self._open()
        self._check_value(value)
        await asyncio.to_thread(write_bytes_durable, self.root / key, value.as_buffer_like(), exclusive)

    def _check_value(self, value: Buffer) -> None:
        self._check_writable()
        if not isinstance(value, Buffer):
            raise TypeError(f"DurableLocalStore.set(): value must be a zarr Buffer, got {type(value)}")


def open_group(path: Path, mode: AccessModeLiteral) -> zarr.Group:
    """The Zarr v3 group at ``path``, read and written through a :class:`DurableLocalStore`."""
    store = DurableLocalStore(path, read_only=mode == "r")
    return zarr.open_group(store=store, mode=mode, zarr_format=3)
