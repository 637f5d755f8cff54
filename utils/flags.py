"""What every entry point's command line shares: the table of the original scripts' compatibility flags, one
precision vocabulary, one compile switch, and turning parsed flags into a frozen config.

Compatibility flags are declared in one table per entry point (``COMPAT = (alias(...), ignored(...), ...)``):
an ``alias`` is the original spelling of something this project does (it sets a config field); an ``ignored``
flag is accepted so that the original command lines run, and given a value other than its default it prints one
line ("--cloud-save-path is accepted for compatibility and ignored"). ``--help`` lists them in their own group.

    p = argparse.ArgumentParser(...)
    add_compat_flags(p, COMPAT)
    args = parse_flags(p, COMPAT, argv)   # the ignored flags are reported and removed from ``args``
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

COMPAT_GROUP = "compatibility flags of the original scripts"


@dataclass(frozen=True)
class CompatFlag:
    """One row of an entry point's compatibility table: ``flag`` with its argparse keywords; ``ignored`` flags do
    nothing here (their value is dropped after parsing, with one printed line when it is not the default)."""
    flag: str
    kwargs: dict = field(default_factory=dict)
    ignored: bool = False

    @property
    def dest(self) -> str:
        return self.kwargs.get("dest") or self.flag.lstrip("-").replace("-", "_")


def alias(flag: str, **kwargs: Any) -> CompatFlag:
    """The original's spelling of one of our flags: it sets the config field ``dest``."""
    return CompatFlag(flag, kwargs)


def ignored(flag: str, help: str = "", **kwargs: Any) -> CompatFlag:
    """A flag of the original scripts that does nothing here."""
    note = "ignored" + (f" ({help})" if help else "")
    return CompatFlag(flag, {**kwargs, "help": note}, ignored=True)


def add_compat_flags(parser: argparse.ArgumentParser, table: Sequence[CompatFlag]) -> argparse._ArgumentGroup:
    group = parser.add_argument_group(COMPAT_GROUP, "accepted so that the original command lines run unchanged")
    for row in table:
        group.add_argument(row.flag, **row.kwargs)
    return group


def ignored_lines(args: argparse.Namespace, table: Sequence[CompatFlag],
                  parser: argparse.ArgumentParser) -> list[str]:
    """One line for each ignored flag given a value other than its default."""
    return [f"{row.flag} is accepted for compatibility and ignored" for row in table
            if row.ignored and getattr(args, row.dest) != parser.get_default(row.dest)]


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def parse_flags(parser: argparse.ArgumentParser, table: Sequence[CompatFlag], argv: Optional[Sequence[str]] = None,
                say: Callable[[str], None] = print) -> argparse.Namespace:
    """Parse ``argv``; report the ignored compatibility flags that were given (rank 0) and drop them."""
    args = parser.parse_args(argv)
    for line in ignored_lines(args, table, parser):
        if is_main_process():
            say(line)
    for row in table:
        if row.ignored:
            delattr(args, row.dest)
    return args


# ---------------------------------------------------------------------------------------------- precision
PRECISIONS = ("fp32", "bf16", "fp16")
PRECISION_ALIASES = {"none": "fp32", "no": "fp32", "float32": "fp32", "bfloat16": "bf16", "float16": "fp16",
                     "half": "fp16"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def precision(text: str) -> str:
    """An argparse type: ``fp32`` / ``bf16`` / ``fp16``; the other spellings in use (``none``, ``float32``,
    ``bfloat16``, ``float16``) are read as these."""
    name = PRECISION_ALIASES.get(text.lower(), text.lower())
    if name not in PRECISIONS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a precision: use one of {', '.join(PRECISIONS)}")
    return name


def add_precision_argument(parser, flag: str = "--mixed-precision", default: Optional[str] = "bf16",
                           help: str = "") -> None:
    parser.add_argument(flag, type=precision, default=default, metavar="{" + ",".join(PRECISIONS) + "}",
                        help=(help + "; " if help else "") + "none, float32, bfloat16, float16 are accepted too")


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[precision(name)]


def add_compile_argument(parser, default: Optional[bool], help: str, flag: str = "--compile") -> None:
    """``--compile`` / ``--no-compile`` (``flag`` / ``--no-<flag>``): the one spelling of every compile switch."""
    parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help)


# ---------------------------------------------------------------------------------------------- configs
def require(condition: bool, message: str) -> None:
    """A config's check: ``message`` (one line, naming the flag) as a ValueError when ``condition`` fails."""
    if not condition:
        raise ValueError(message)


def from_flags(cls: type, args: argparse.Namespace, **extra: Any):
    """The frozen config ``cls`` from parsed flags: every field from the attribute of the same name."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
                  if f.name not in extra and hasattr(args, f.name)}, **extra)


def config_namespace(cfg: Any, exclude: Iterable[str] = ()) -> argparse.Namespace:
    """A config as the argparse ``Namespace`` that checkpoints store under ``args`` (the original scripts' key)."""
    return argparse.Namespace(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                                 if f.name not in exclude})


def parser_dests(parser: argparse.ArgumentParser) -> set[str]:
    return {a.dest for a in parser._actions if a.dest != "help"}
