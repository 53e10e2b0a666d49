#!/usr/bin/env python3
"""Thin wrapper: ``tools/convert_hf.py import-hf|export-hf ...`` = ``pivot-mega convert ...``."""

import sys

from pivot_mega.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
