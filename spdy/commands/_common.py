"""What the ``spdy`` subcommands share: flags whose choices come from the library's
constants, one ``--grid-levels`` flag, and one progress adapter for the library's callbacks.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from typing import Any

from spdy.errors import InvalidInputError
from spdy.grid import DEFAULT_GRID, SparsityGrid

log = logging.getLogger(__name__)

#: Renders as nothing; keeps the help formatter from appending "(default: None)".
NO_DEFAULT = "%(default).0s"


def add_method_flag(p: argparse.ArgumentParser, help: str) -> None:
    """``--method``: the database's reconstruction method."""
    from spdy.database.reconstruction import METHODS

    p.add_argument("--method", default="obs", choices=METHODS, help=help)


def add_dtype_flag(p: argparse.ArgumentParser) -> None:
    """``--dtype``: compute dtype of the torch backends."""
    from spdy.profilers.torch_backends import TORCH_DTYPES

    p.add_argument("--dtype", default=None, choices=TORCH_DTYPES,
                   help="compute dtype of torch backends (torch-cuda default float16, torch-cpu float32)" + NO_DEFAULT)


def add_patterns_flag(p: argparse.ArgumentParser, help: str) -> None:
    """``--patterns N:M[,N:M]``: N:M semi-structured patterns (read by :func:`spdy.choices.parse_patterns`)."""
    p.add_argument("--patterns", default="", metavar="N:M[,N:M]", help=help + NO_DEFAULT)


def add_grid_flag(p: argparse.ArgumentParser, extra_help: str = "") -> None:
    """``--grid-levels S [S ...]``: the sparsities of the grid (see :func:`grid_from_levels`)."""
    p.add_argument("--grid-levels", type=float, nargs="+", default=None, metavar="S",
                   help="sparsity levels (0 is added if missing; default: SPDY's 42-level grid)" + extra_help + NO_DEFAULT)


def grid_from_levels(levels: Sequence[float] | None, default: SparsityGrid = DEFAULT_GRID, *,
                     count_form: Callable[[int], SparsityGrid] | None = None) -> SparsityGrid:
    """The grid of ``--grid-levels``: the sparsities given (0 added, sorted), or ``default``.

    With ``count_form``, a single whole number >= 1 is the old spelling of a level count:
    it still works, through ``count_form(n)``, with a one-line deprecation warning.
    """
    if not levels:
        return default
    if count_form is not None and len(levels) == 1 and levels[0] >= 1 and float(levels[0]).is_integer():
        n = int(levels[0])
        log.warning("--grid-levels %d as a count of levels is deprecated: pass the sparsities (e.g. --grid-levels "
                    "0.5 0.7 0.9) or leave it out for SPDY's grid between --min-sparsity and --max-sparsity", n)
        return count_form(n)
    bad = [s for s in levels if not 0.0 <= s < 1.0]
    if bad:
        raise InvalidInputError(f"--grid-levels takes sparsities in [0, 1), such as 0.5 0.7 0.9; got {bad[0]:g}")
    lv = sorted(set(float(s) for s in levels))
    if lv[0] != 0.0:
        lv = [0.0, *lv]
    return SparsityGrid(tuple(lv))


class ProgressBars:
    """One tqdm bar per stage, fed by the library's progress callbacks.

    ``bars(stage, done, total, info)`` is the search's callback; ``bars.stage(name)`` gives
    the ``progress(done, total, info)`` callback of a single stage (the profiler's). A bar
    closes when its stage is done, the rest at :meth:`close`.
    """

    #: a search's trial is one evaluation of Algorithm 4, one generation of evo
    UNITS = {"profile": "layer", "validate": "model", "search": "trial", "measure": "step"}

    def __init__(self) -> None:
        self.bars: dict[str, Any] = {}

    def __call__(self, stage: str, done: int, total: int, info: str) -> None:
        from tqdm import tqdm

        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(total=total, desc=stage, unit=self.UNITS.get(stage, "it"), dynamic_ncols=True)
        if bar.total != total:
            bar.total = total
        bar.update(max(0, done - bar.n))
        bar.set_postfix_str(info[-40:], refresh=True)
        if done >= total:
            bar.close()

    def stage(self, name: str) -> Callable[[int, int, str], None]:
        """The ``progress(done, total, info)`` callback of stage ``name``."""
        return lambda done, total, info: self(name, done, total, info)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
