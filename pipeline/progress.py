"""Progress: a bar with images/s and ETA on a terminal, plain log lines otherwise."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


class Progress:
    """Counts units (images, samples) towards a total; reports speed and ETA."""

    def __init__(self, total: int, desc: str, unit: str = "img", log_every_s: float = 10.0,
                 stream=None):
        self.stream = stream or sys.stderr
        self.total, self.desc, self.unit = total, desc, unit
        self.done = 0
        self.start = time.perf_counter()
        self.last_log = self.start
        self.log_every_s = log_every_s
        self.bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True) \
            if self.stream.isatty() else None

    @property
    def rate(self) -> float:
        elapsed = time.perf_counter() - self.start
        return self.done / elapsed if elapsed > 0 else 0.0

    def update(self, n: int, postfix: str = "", force_log: bool = False) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix_str(postfix, refresh=False)
            return
        now = time.perf_counter()
        if force_log or now - self.last_log >= self.log_every_s:
            self.last_log = now
            self.log(postfix)

    def log(self, postfix: str = "") -> None:
        rate = self.rate
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        print(f"{self.desc}: {self.done}/{self.total} {self.unit}, {rate:.1f} {self.unit}/s, "
              f"ETA {eta:.0f} s {postfix}".rstrip(), file=self.stream, flush=True)

    def write(self, message: str) -> None:
        """A message that does not break the bar."""
        if self.bar is not None:
            self.bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
