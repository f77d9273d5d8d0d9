"""The run dir's log file (moeprune.log). A log that cannot be written (a full disk, a dir removed
under the run) costs the log, not a "--- Logging error ---" traceback on every later line: one
warning on stderr, then no more writes are tried. The run's results live in the cache and run.json,
whose writes fail loudly on their own."""

from __future__ import annotations

import logging
import sys


class RunLogFile(logging.FileHandler):
    failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):  # a formatting bug is a bug: logging's own report
            return super().handleError(record)
        self._give_up(error)

    def close(self) -> None:
        try:
            super().close()  # flushes what a full disk refused: it fails again
        except OSError as error:
            self._give_up(error)

    def _give_up(self, error: OSError) -> None:
        if not self.failed:
            print(f"moeprune: warning: cannot write the run log {self.baseFilename} ({error.strerror or error}); "
                  "the run goes on without it", file=sys.stderr)
        self.failed = True
        self.setLevel(logging.CRITICAL + 1)  # nothing reaches emit() again
