"""Reading ahead: the next batches are read and collated in a background thread while the training step runs."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import torch


class Prefetch:
    """Iterate `source` in a background thread, up to `depth` items ahead, in order, so reading and collating the
    next batch overlaps the training step (file reads and array copies release the GIL). `pin=True` pins each
    batch's tensors for asynchronous host-to-GPU copies. An exception in the source is raised at the consumer."""

    _END = object()

    def __init__(self, source: Iterator[dict[str, Any]], depth: int = 2, pin: bool = False) -> None:
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.pin = pin
        self.thread = threading.Thread(target=self._run, args=(source,), daemon=True, name="pixart-prefetch")
        self.thread.start()

    def _run(self, source: Iterator[dict[str, Any]]) -> None:
        try:
            for item in source:
                if self.pin:
                    item = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in item.items()}
                while not self.stop.is_set():
                    try:
                        self.queue.put(item, timeout=0.1)
                        break
                    except queue.Full:  # retry until the consumer takes it, or stops
                        continue
                if self.stop.is_set():
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self.queue.put(e)
            return
        self.queue.put(self._END)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        item = self.queue.get()
        if item is self._END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self.stop.set()
