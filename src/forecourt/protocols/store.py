"""Driver stores: where a driver keeps what its protocol lacks, durably (see DriverStore)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any


class MemoryDriverStore:
    """A store that lives as long as the process (tests, tools that poll once)."""

    def __init__(self) -> None:
        self._values: dict[str, dict[str, Any]] = {}

    async def load(self, key: str) -> dict[str, Any] | None:
        value = self._values.get(key)
        return None if value is None else json.loads(json.dumps(value))

    async def save(self, key: str, value: dict[str, Any]) -> None:
        self._values[key] = json.loads(json.dumps(value))


class FileDriverStore:
    """One JSON file per key in a directory; a save is written, fsynced and renamed in place,
    so a crash leaves the old value or the new one, never a torn file."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def _path(self, key: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
        return self.directory / f"{safe}.json"

    async def load(self, key: str) -> dict[str, Any] | None:
        return await asyncio.to_thread(self._load, key)

    def _load(self, key: str) -> dict[str, Any] | None:
        try:
            text = self._path(key).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        value = json.loads(text)
        return value if isinstance(value, dict) else None

    async def save(self, key: str, value: dict[str, Any]) -> None:
        await asyncio.to_thread(self._save, key, value)

    def _save(self, key: str, value: dict[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self._path(key)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(value, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
