"""The command line every kernel micro-benchmark shares (``fast``, ``bn_act``, ``gemm``): a parser
described by the script's docstring, with ``--threads``, applied when parsed."""

from __future__ import annotations

import argparse

import torch


def parser(doc: str) -> argparse.ArgumentParser:
    """A parser described by the first line of ``doc``, with ``--threads``; add the script's flags."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = torch default)")
    return p


def parse(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """``p.parse_args(argv)``, with torch's thread count set from ``--threads``."""
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args
