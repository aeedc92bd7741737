"""Micro-batches loaded ahead by threads while one trains: the part `BatchStream` (a dataset) and `StreamBatches`
(a stream) share. A subclass gives `indices(micro)` (what micro-batch `micro` holds, read in the caller's thread,
so the order never depends on the threads) and `_load(*indices)` (decode and augment, in a thread)."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor


class Prefetching:
    workers: int

    def _start_prefetch(self, workers: int, name: str) -> None:
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.workers = workers
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix=name) if workers else None
        self._ahead: dict[int, Future] = {}  # micro-batch -> its items being loaded

    def indices(self, micro: int) -> tuple:
        raise NotImplementedError

    def _load(self, *indices) -> list:
        raise NotImplementedError

    def get(self, micro: int) -> list:
        """The items of micro-batch `micro`; with workers, the next `workers` micro-batches start loading."""
        if self._pool is None:
            return self._load(*self.indices(micro))
        wanted = range(micro, micro + self.workers + 1)
        for m in [m for m in self._ahead if m not in wanted]:  # after a jump (resume): not needed any more
            self._ahead.pop(m).cancel()
        for m in wanted:
            if m not in self._ahead:
                self._ahead[m] = self._pool.submit(self._load, *self.indices(m))  # indices in this thread
        return self._ahead.pop(micro).result()  # a worker's exception (strict data) is raised here

    def close(self) -> None:
        """Stop the loading threads (micro-batches loaded ahead are dropped)."""
        if self._pool is not None:
            for future in self._ahead.values():
                future.cancel()
            self._ahead.clear()
            self._pool.shutdown(wait=True)
            self._pool = None
