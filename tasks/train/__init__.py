"""FM pretraining and CAFM post-training on Ray Train (distributed data parallel).

Read in this order:

* :mod:`tasks.train.driver` - the entry points ``run_flow_matching`` / ``run_cafm``: every
  input checked before Ray starts, resume from an earlier run, the ``TorchTrainer``.
* :mod:`tasks.train.worker_loop` - the loop each Ray Train worker runs, top to bottom.
* :mod:`tasks.train.train_state` - a training state as a checkpoint (no pickle) and the
  run's checkpoints on storage.
* :mod:`tasks.train.shards` - the prepared Parquet shards as Ray Data batches.
* :mod:`tasks.train.configs` - stage configs from plain fields.

How Ray Train 2.60 behaves where this code relies on it: docs/ray.md.
"""
