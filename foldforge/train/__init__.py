"""Training (``foldforge train``): everything applied *around* the model, which knows nothing of it.

- ``loop``: the training loop, readable top to bottom (``run`` is the CLI entry, ``train`` the loop)
- ``optim``: Adam, the AF2 learning-rate schedule, EMA of the weights (AF2 Suppl. 1.11.3, 1.11.7)
- ``checkpoint``: atomic pickle-free checkpoints, the run's ``config.json``, ``--set`` overrides, resume
- ``distributed``: torchrun detection, DDP, the rank-sharded sampler
- ``metrics``: JSONL (+ TensorBoard) metrics and the progress bar

Submodules are imported explicitly (``from foldforge.train.loop import run``); importing the package
itself loads nothing.
"""
