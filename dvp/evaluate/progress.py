"""Progress of a long evaluation pass on stderr, and what the IS-NLL will cost before it starts."""
from __future__ import annotations

import sys
import time
from datetime import timedelta

from tqdm import tqdm


class ImageProgress:
    """Progress of a pass over `total` images on stderr: on a terminal a tqdm bar counting images (with ETA),
    otherwise a plain line at most every `period` seconds (0: every update) and one at the end, e.g.
    `IS-NLL 2,000/10,000 images, 20%, nll 95.31, elapsed 0:06:12, eta 0:24:48`."""

    def __init__(self, total: int, desc: str, period: float = 30.0, show: bool = True) -> None:
        self.total, self.desc, self.period, self.show = total, desc, period, show
        self.done = 0
        self.start = self.last = time.monotonic()
        self.bar = (tqdm(total=total, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True)
                    if show and sys.stderr.isatty() else None)

    def __enter__(self) -> ImageProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()

    def update(self, n: int, postfix: str) -> None:
        """Count `n` more images done; `postfix` (e.g. 'nll 95.31') goes on the bar or line."""
        self.done += n
        if self.bar is not None:
            self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.update(n)
            return
        now = time.monotonic()
        if self.show and (now - self.last >= self.period or self.done >= self.total):
            self.last = now
            print(progress_line(self.desc, self.done, self.total, now - self.start, postfix), file=sys.stderr,
                  flush=True)


def progress_line(desc: str, done: int, total: int, elapsed: float, postfix: str) -> str:
    """One plain progress line; eta = elapsed (total - done) / done."""
    eta = elapsed * (total - done) / done if done else 0.0
    return (f"{desc} {done:,}/{total:,} images, {100 * done / total:.0f}%, {postfix}, "
            f"elapsed {timedelta(seconds=round(elapsed))}, eta {timedelta(seconds=round(eta))}")


def _duration(seconds: float) -> str:
    """'45 s', '35 min' or '2.5 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def is_nll_cost(images: int, k: int, elbo_seconds: float) -> str:
    """What the IS-NLL will cost: images x K forward samples, taking about K x the time of the ELBO pass over
    the same images (each importance sample is one forward pass, like the ELBO's single sample)."""
    return (f"IS-NLL: {images:,} test images x K={k:,} samples ({images * k:,} forward passes), "
            f"about {_duration(k * elbo_seconds)} at the rate of the ELBO pass ({elbo_seconds:.2f} s)")
