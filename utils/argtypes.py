"""Argument types that check counts and ranges at the edge: every entry point refuses zero, negative or non-finite
values where they make no sense, in one line (argparse's ``error: argument --x: ...``), before any work.

    p.add_argument("--ckpt-every", type=positive_int, default=5000)
"""
from __future__ import annotations

import argparse
import math


def _number(kind: type, text: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (counts, intervals, batch sizes)."""
    value = _number(int, text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def nonnegative_int(text: str) -> int:
    """An integer >= 0 (limits where 0 means 'none' or 'all', worker counts)."""
    value = _number(int, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be >= 0")
    return value


def finite_float(text: str) -> float:
    """Any finite number (nan and inf are refused)."""
    return _number(float, text)


def positive_float(text: str) -> float:
    """A finite number > 0 (learning rates, temperatures, timeouts)."""
    value = _number(float, text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be > 0")
    return value


def nonnegative_float(text: str) -> float:
    """A finite number >= 0 (loss weights, gradient-norm limits where 0 means off)."""
    value = _number(float, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be >= 0")
    return value


def unit_float(text: str) -> float:
    """A number in [0, 1] (probabilities, decays, top-p)."""
    value = _number(float, text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{value} must be in [0, 1]")
    return value


def byte_size(text: str) -> int:
    """A positive number of bytes, with an optional K, M, G or T suffix (powers of 1024): ``500M``, ``1G``."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    scale = units.get(text[-1:].upper(), 1)
    value = _number(float, text[:-1] if scale > 1 else text)
    if value * scale < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1 byte")
    return int(value * scale)


def positive_unit_float(text: str) -> float:
    """A number in (0, 1] (top-p: 0 would keep no token)."""
    value = _number(float, text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{value} must be in (0, 1]")
    return value


SEED_LIMIT = 2 ** 63


def seed_int(text: str) -> int:
    """A random seed: an integer in [0, 2^63), what every random stream of the project (torch's generators, the
    sampler's counter-based streams) accepts."""
    value = _number(int, text)
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"{value} must be in [0, 2^63)")
    return value
