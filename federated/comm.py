"""Communication accounting: bytes of the arrays a client or the server actually sends."""

from __future__ import annotations

from typing import Mapping

import numpy as np

__all__ = ["array_bytes", "RoundTraffic"]


def array_bytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Total payload bytes of ``arrays`` (sum of ``ndarray.nbytes``; names and framing excluded).

    Args:
        arrays: name -> array, exactly as sent.

    Returns:
        The number of bytes.
    """
    return int(sum(np.asarray(a).nbytes for a in arrays.values()))


class RoundTraffic:
    """Accumulates bytes up (client -> server) and down (server -> client) for one round."""

    def __init__(self) -> None:
        self.up: dict[str, int] = {}
        self.down: dict[str, int] = {}

    def sent_down(self, client: str, arrays: Mapping[str, np.ndarray]) -> None:
        """Records the arrays the server sent to ``client``."""
        self.down[client] = self.down.get(client, 0) + array_bytes(arrays)

    def sent_up(self, client: str, arrays: Mapping[str, np.ndarray]) -> None:
        """Records the arrays ``client`` sent back."""
        self.up[client] = self.up.get(client, 0) + array_bytes(arrays)

    def totals(self) -> dict[str, int]:
        """``{"bytes_up", "bytes_down"}`` summed over clients."""
        return {"bytes_up": sum(self.up.values()), "bytes_down": sum(self.down.values())}
