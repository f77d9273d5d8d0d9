"""argparse for moeprune's plain subcommands (compare, report), with errors in moeprune's form: one
`moeprune: error:` line naming what is missing and what is expected, exit 2."""

from __future__ import annotations

import argparse
import sys


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own: a usage block, then "<prog>: error: ..."
        usage = " ".join(self.format_usage().split())[len("usage: "):]
        print(f"moeprune: error: {self.prog}: {message}; expected: {usage}", file=sys.stderr)
        sys.exit(2)
