#!/usr/bin/env python3
"""Thin wrapper: ``tools/build_shards.py --kind ... --input ... --out ...`` = ``pivot-mega data build-shards ...``."""

import sys

from pivot_mega.cli import main

if __name__ == "__main__":
    sys.exit(main(["data", "build-shards", *sys.argv[1:]]))
