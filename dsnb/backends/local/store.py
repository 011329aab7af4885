"""The rendezvous store of a local job, on loopback only, hosted by the supervisor.

torch's TCPStore server, which rank 0 would start for ``init_process_group``, listens on every
interface (``*:MASTER_PORT``) with no authentication: anyone on the network could read and
overwrite a job's rendezvous keys. Here the supervisor binds the port on ``127.0.0.1`` itself and
hands the socket to a TCPStore it hosts (``master_listen_fd``); the ranks are told to use that
store as torchelastic's agent store (``TORCHELASTIC_USE_AGENT_STORE``), so no rank starts one, and
gloo and NCCL are kept on the loopback interface. The socket is bound before the ranks start;
torch, slow to import, is imported meanwhile in a thread, and the ranks' connections wait in the
socket's backlog until the store answers.

Example::

    store = LoopbackStore("127.0.0.1")
    env = {**store.rank_env(), "MASTER_PORT": str(store.port)}
    ...
    store.close()
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from datetime import timedelta
from typing import Any

#: What the rendezvous waits for at most, as torch's own default.
STORE_TIMEOUT = timedelta(minutes=30)


class LoopbackStore:
    """A TCPStore on ``address`` (a loopback address) for one attempt of a job."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind((address, 0))
        self._socket.listen(1024)
        self.port: int = self._socket.getsockname()[1]
        self.store: Any = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._start, name="dsnb-store", daemon=True)
        self._thread.start()

    def _start(self) -> None:
        try:
            from torch.distributed import TCPStore
        except ImportError as e:  # a job without torch needs no store
            self.error = e
            return
        try:
            # The store takes the descriptor it is given as its own (it closes it): give it a duplicate.
            self.store = TCPStore(self.address, self.port, None, True, STORE_TIMEOUT, wait_for_workers=False,
                                  master_listen_fd=os.dup(self._socket.fileno()), use_libuv=True)
        except Exception as e:  # noqa: BLE001 - the ranks then fail to rendezvous, and say so
            self.error = e

    def rank_env(self) -> dict[str, str]:
        """What each rank needs to use this store, and to keep its collectives on loopback."""
        interface = "lo" if sys.platform.startswith("linux") else "lo0"
        return {"TORCHELASTIC_USE_AGENT_STORE": "True", "GLOO_SOCKET_IFNAME": interface, "NCCL_SOCKET_IFNAME": interface}

    def close(self) -> None:
        self._thread.join(timeout=30)
        self.store = None  # torch stops the server when the store object goes
        self._socket.close()
