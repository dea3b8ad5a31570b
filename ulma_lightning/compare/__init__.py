"""``ulma compare``: a grid of runs (methods x data variants x seeds, stages chained), trained and
evaluated on held-out data, reported as ``results.md``, ``results.json`` and PNG plots.

Modules: :mod:`~ulma_lightning.compare.spec` (the grid YAML, checked before any training),
:mod:`~ulma_lightning.compare.stages` (planning and training stages, shared and resumable),
:mod:`~ulma_lightning.compare.metrics` (the numbers of one model), :mod:`~ulma_lightning.compare.report`
(win rates, tables, results files), :mod:`~ulma_lightning.compare.plots` and
:mod:`~ulma_lightning.compare.runner` (the command).
"""

from ulma_lightning.compare.spec import GridError, GridSpec, load_grid

__all__ = ["GridError", "GridSpec", "compare", "compare_main", "load_grid"]


def __getattr__(name: str):  # the runner imports torch-heavy modules: load it on first use
    if name in ("compare", "compare_main"):
        from ulma_lightning.compare import runner

        return getattr(runner, name)
    raise AttributeError(name)
