"""Run anything with every `torch.manual_seed(s)` turned into `torch.manual_seed(s + SEED_OFFSET)`.

An audit of the notebooks' and tests' assertions about random draws (initial weights, training runs): an assertion
that holds for seed 0 alone is luck, and another torch version, whose draws from the same seed differ, breaks it.
Python imports this file at start-up when its folder is on PYTHONPATH, and so does every notebook kernel and
subprocess started from there:

    SEED_OFFSET=2 PYTHONPATH=scripts/shifted_seeds IPYTHONDIR=.venv/ipython \
        .venv/bin/python -m pytest --nbmake notebooks
    SEED_OFFSET=2 PYTHONPATH=scripts/shifted_seeds .venv/bin/python -m pytest tests

Without SEED_OFFSET (or with 0) it changes nothing. `torch.Generator().manual_seed` is left alone: the loaders'
orders and augmentations stay those of their own seeds.
"""
import os

_offset = int(os.environ.get("SEED_OFFSET", "0"))
if _offset:
    import torch

    _manual_seed = torch.manual_seed

    def _shifted_manual_seed(seed):
        return _manual_seed(int(seed) + _offset)

    torch.manual_seed = _shifted_manual_seed
    torch.random.manual_seed = _shifted_manual_seed
