"""The progress bar of training and feature extraction, with log lines kept off the bar's line.

A log record written to the console while a tqdm bar is drawn would continue the bar's line. While
a ``ProgressBar`` is open, the root logger's console handler writes through ``tqdm.write`` instead,
which clears the bar, prints the record on its own line and redraws the bar below it. Log files are
untouched.
"""

from __future__ import annotations

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm


class ProgressBar(tqdm):
    """tqdm's bar (same arguments) that routes console logging through ``tqdm.write`` until it is
    closed (``close()``, or the end of a ``with`` block); a disabled bar leaves logging alone."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._redirect = None
        if not self.disable:
            self._redirect = logging_redirect_tqdm(tqdm_class=type(self))
            self._redirect.__enter__()

    def close(self) -> None:
        try:
            super().close()
        finally:
            # getattr: tqdm's __del__ closes a bar whose __init__ may have failed before this was set
            redirect, self._redirect = getattr(self, "_redirect", None), None
            if redirect is not None:
                redirect.__exit__(None, None, None)
