"""Dynamic batching for what is one call per batch: labelling, tagging, answering, embedding, seq2seq.

Requests that arrive within a short wait of each other are put through the model together. Each
item carries a key (a seq2seq request's decoding options): only items with the same key share a
call, so that every item gets what it would alone.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Any

import torch

log = logging.getLogger("lmforge")


class BatchWorker:
    """Runs ``run(key, items) -> outputs`` on batches of the items submitted close together, in one thread.

    Args:
        run: the batch function; it returns one output per item, in order.
        max_batch_size: most items in one call.
        wait_s: how long the first item of a batch waits for others.
    """

    def __init__(self, run: Callable[[Hashable, list[Any]], list[Any]], max_batch_size: int, wait_s: float):
        self.run, self.max_batch_size, self.wait_s = run, max_batch_size, wait_s
        self.waiting: queue.Queue[tuple[Hashable, Any, Future] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="lmforge-batches", daemon=True)

    def start(self) -> None:
        """Start the worker's thread."""
        self._thread.start()

    def close(self) -> None:
        """Finish the items already submitted, then stop the thread."""
        self.waiting.put(None)
        self._thread.join()

    def submit(self, item: Any, key: Hashable = None) -> Future:
        """Queue an item; the future gets its output (cancel it to drop an item that has not run yet)."""
        future: Future = Future()
        self.waiting.put((key, item, future))
        return future

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                batch, closing = self._collect()
                self._run(batch)
                if closing:
                    return

    def _collect(self) -> tuple[list[tuple[Hashable, Any, Future]], bool]:
        """The next batch: the first waiting item and those that come within ``wait_s`` of it."""
        first = self.waiting.get()
        if first is None:
            return [], True
        batch, deadline = [first], time.monotonic() + self.wait_s
        while len(batch) < self.max_batch_size:
            try:
                item = self.waiting.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    def _run(self, batch: list[tuple[Hashable, Any, Future]]) -> None:
        groups: dict[Hashable, list[tuple[Any, Future]]] = {}
        for key, item, future in batch:
            if future.set_running_or_notify_cancel():  # a cancelled item (its client left) is dropped
                groups.setdefault(key, []).append((item, future))
        for key, entries in groups.items():
            try:
                outputs = self.run(key, [item for item, _ in entries])
            except Exception as err:  # the batch's requests fail; the server goes on
                log.exception("batch failed")
                for _, future in entries:
                    future.set_exception(err)
                continue
            for (_, future), output in zip(entries, outputs, strict=True):
                future.set_result(output)
