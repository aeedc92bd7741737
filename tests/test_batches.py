"""BatchStream: the data order is a function of (seed, step), and `dataloader_num_workers` threads load the
next micro-batches ahead without changing what any micro-batch holds."""

import threading

import pytest

from diffalign.errors import UserError
from diffalign.training.batches import BatchStream


class _Items:
    """item(i, epoch) -> (i, epoch); records which thread loaded what, and can fail on one row."""

    def __init__(self, n: int, bad: int | None = None):
        self.n, self.bad, self.loads, self.lock = n, bad, [], threading.Lock()

    def __len__(self) -> int:
        return self.n

    def item(self, i: int, epoch: int):
        with self.lock:
            self.loads.append((i, epoch, threading.current_thread().name))
        if i == self.bad:
            raise UserError(f"row {i}: undecodable image")
        return (i, epoch)


@pytest.mark.parametrize("rank,world", [(0, 1), (1, 2)])
def test_workers_load_ahead_and_give_the_same_batches(rank, world):
    plain = BatchStream(_Items(10), 3, seed=7, rank=rank, world=world)
    data = _Items(10)
    ahead = BatchStream(data, 3, seed=7, rank=rank, world=world, workers=2)
    order = [0, 1, 2, 3, 4, 9, 10, 2, 3]  # crosses epochs, then jumps back as a resume would
    try:
        assert [ahead.get(m) for m in order] == [plain.get(m) for m in order]
        assert sorted(ahead._ahead) == [4, 5]  # after the jump back to 3: only what is ahead of it is kept
        ahead.get(11)
        for future in list(ahead._ahead.values()):
            future.result()
        # get(11) asked for micro-batches 12 and 13 ahead: both loaded (in the workers), nothing for 14.
        loaded = {(i, e) for i, e, _ in data.loads}
        for m in (12, 13):
            idx, epoch = plain.indices(m)
            assert {(i, epoch) for i in idx} <= loaded
        assert {name.split("_")[0] for _, _, name in data.loads} == {"diffalign-data"}
    finally:
        ahead.close()
    assert ahead._pool is None


def test_a_workers_error_reaches_the_caller():
    bad_row = BatchStream(_Items(6), 2, seed=0).indices(1)[0][0]
    stream = BatchStream(_Items(6, bad=bad_row), 2, seed=0, workers=1)
    try:
        stream.get(0)  # loads micro-batch 1 ahead, in a worker, where the row fails
        with pytest.raises(UserError, match=f"row {bad_row}: undecodable image"):
            stream.get(1)
    finally:
        stream.close()

