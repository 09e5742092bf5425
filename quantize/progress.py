"""Progress of long steps: a bar on a terminal, a few log lines otherwise (CI logs stay readable).

The library only calls :func:`progress`; whether bars are drawn is decided at the edge (the CLI
turns them on when stderr is a terminal), as the library itself only logs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import TypeVar

# tqdm is imported only when a bar is drawn: the command line imports this module before it knows,
# and `quantize ladder` runs on the standard library alone.

log = logging.getLogger(__name__)
T = TypeVar("T")

BARS = False  # set by the command line when stderr is a terminal


def progress(items: Iterable[T], total: int, desc: str) -> Iterator[T]:
    if BARS:
        from tqdm import tqdm

        yield from tqdm(items, total=total, desc=desc, leave=False, dynamic_ncols=True)
        return
    marks = {max(1, total * k // 4) for k in (1, 2, 3, 4)}
    for i, item in enumerate(items, 1):
        yield item
        if i in marks:
            log.info("%s: %d/%d", desc, i, total)
