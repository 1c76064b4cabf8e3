"""The training workers' input path without Ray: rows held in memory, batches drawn there,
and a single process trained without a DDP wrapper around it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tasks.train.shards import IN_MEMORY_MAX_BYTES, holds_in_memory, in_memory_batches
from tasks.train.stages import prepare_modules


def test_in_memory_batches_are_full_epochs_of_the_rows_reshuffled_each_epoch():
    x = torch.arange(10, dtype=torch.float32).reshape(10, 1)
    y = torch.arange(10)
    batches = in_memory_batches((x, y), 3, torch.device("cpu"), seed=7)
    epochs = [[next(batches) for _ in range(3)] for _ in range(2)]  # 3 full batches of 3 per epoch, 1 row dropped
    for epoch in epochs:
        seen = torch.cat([bx[:, 0] for bx, _ in epoch])
        assert len(set(seen.tolist())) == 9  # no row twice within an epoch
        for bx, by in epoch:
            assert bx.shape == (3, 1) and torch.equal(bx[:, 0].long(), by)  # rows keep their labels
    first, second = (torch.cat([b[1] for b in e]) for e in epochs)
    assert not torch.equal(first, second)  # a new permutation each epoch
    again = in_memory_batches((x, y), 3, torch.device("cpu"), seed=7)
    assert torch.equal(next(again)[1], epochs[0][0][1])  # the seed decides the order


def test_in_memory_batches_without_labels_and_too_few_rows():
    batches = in_memory_batches((torch.zeros(4, 2), None), 4, torch.device("cpu"), seed=0)
    bx, by = next(batches)
    assert bx.shape == (4, 2) and by is None
    with pytest.raises(RuntimeError, match="fewer than batch_size=5 rows"):
        next(in_memory_batches((torch.zeros(4, 2), None), 5, torch.device("cpu"), seed=0))


def test_in_memory_batches_equal_the_rows_they_index_on_the_device():
    """The same batches whether the rows sit on the CPU or are moved (non-blocking) to the
    device first; on a CUDA machine the second draws on the GPU."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x, y = torch.randn(50, 3), torch.randint(0, 10, (50,))
    here = in_memory_batches((x, y), 8, torch.device("cpu"), seed=3)
    there = in_memory_batches((x.pin_memory() if device.type == "cuda" else x, y), 8, device, seed=3)
    for _ in range(12):
        (ax, ay), (bx, by) = next(here), next(there)
        assert torch.equal(ax, bx.cpu()) and torch.equal(ay, by.cpu())


def test_which_shares_are_held_in_memory():
    assert holds_in_memory(1797, (1, 8, 8))  # digits: 0.5 MB
    assert holds_in_memory(50_000, (3, 32, 32))  # CIFAR-size: 0.6 GB
    assert not holds_in_memory(100_000, (3, 32, 32))  # 1.23 GB streams
    assert not holds_in_memory(1_281_167, (3, 64, 64))  # ImageNet-1k at 64 px streams
    rows = IN_MEMORY_MAX_BYTES // (4 * 64 + 8)
    assert holds_in_memory(rows, (64,)) and not holds_in_memory(rows + 1, (64,))


def test_a_single_process_trains_without_a_ddp_wrapper():
    class OneProcess:  # stands in for Accelerate on CPU (MULTI_CPU), which wraps even one process in DDP
        num_processes = 1

        def prepare(self, module, optimizer):
            return Wrapped(module), optimizer

    class Wrapped(torch.nn.parallel.DistributedDataParallel):
        def __init__(self, module):  # no process group needed to stand in for DDP here
            nn.Module.__init__(self)
            self.module = module

    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    prepared, same_optimizer = prepare_modules(OneProcess(), model, optimizer)
    assert prepared is model and same_optimizer is optimizer
    OneProcess.num_processes = 2
    assert isinstance(prepare_modules(OneProcess(), model, optimizer)[0], Wrapped)


def test_read_rows_gives_each_worker_an_equal_interleaved_share_of_the_shards(tmp_path):
    """Two uint8 shards of 5 and 6 rows (pixel value = row number), 2 workers: 5 rows each,
    disjoint, scaled to [-1, 1] like Ray Data's batches (the same collate), labels kept."""
    import numpy as np

    from tasks.dataset_format import shard_to_bytes
    from tasks.train.shards import ShardCollate, read_rows

    urls = []
    for number, rows in enumerate((range(0, 5), range(5, 11))):
        x = np.repeat(np.array(list(rows), dtype=np.uint8)[:, None], 4, axis=1)
        path = tmp_path / f"shard-{number}.parquet"
        path.write_bytes(shard_to_bytes(x, np.array(list(rows)) % 3, np.array(list(rows)), (1, 2, 2)))
        urls.append(str(path))
    collate = ShardCollate((1, 2, 2), num_classes=3)
    shares = [read_rows(urls, collate, rank, 2) for rank in (0, 1)]
    numbers = []
    for x, y in shares:
        assert x.shape == (5, 1, 2, 2) and x.dtype == torch.float32
        row = torch.round((x[:, 0, 0, 0] + 1) * 127.5).long()
        assert torch.equal(y, row % 3)
        numbers.append(row.tolist())
    assert numbers == [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]  # row 10 left out: equal shares
