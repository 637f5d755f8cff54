"""Command lines derived from configs: every entry point's frozen config dataclass is the one declaration of its
flags, and the argparse parser is built from it.

A field declared with ``flag(...)`` carries everything about its flag: the default (the field's), the argparse
type or action that checks it (``utils/argtypes.py``), help, the help group, the original scripts' other spellings
(``aliases``), and two facts the runs query instead of keeping name lists: ``resume`` (``"fixed"``: refused when it
changes on resume, since the saved data position or weights would be read with another meaning; ``"ignored"``: not
compared at all; ``"free"``: printed as changed) and ``output`` (whether it changes what the command writes: the
resumable outputs of extraction and sampling are keyed by the fields with ``output=True``).

    @dataclass(frozen=True)
    class ExtractConfig:
        IGNORED = (ignored("--debug", action="store_true"),)   # accepted, does nothing here
        data_path: str = flag("", required=True, help="ImageFolder root")
        batch_size: int = flag(16, type=positive_int, output=False, help="images per forward pass")

    cfg = parse_config(ExtractConfig, argv, description="...")   # argparse errors exit with one line

Compatibility flags of the original scripts: an ``alias`` is another spelling of a field (it sets it); an
``ignored`` row (the config's ``IGNORED`` tuple) is accepted so the original command lines run, and given a value
other than its default prints one line ("--cloud-save-path is accepted for compatibility and ignored"). ``--help``
lists both in their own group. Named recipes (``--recipe``) are dicts of field values applied as the parser's
defaults, so any flag given on the command line still wins.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch

COMPAT_GROUP = "compatibility flags of the original scripts"
RESUME = ("free", "fixed", "ignored")


@dataclass(frozen=True)
class CompatFlag:
    """One compatibility spelling: ``flag`` with its argparse keywords; ``ignored`` flags set nothing (their value
    is dropped after parsing, with one printed line when it is not the default)."""
    flag: str
    kwargs: dict = field(default_factory=dict)
    ignored: bool = False

    @property
    def dest(self) -> str:
        return self.kwargs.get("dest") or self.flag.lstrip("-").replace("-", "_")


def alias(flag: str, **kwargs: Any) -> CompatFlag:
    """The original's spelling of a field's flag (as ``flag(aliases=...)``; ``kwargs`` default to the field's)."""
    return CompatFlag(flag, kwargs)


def ignored(flag: str, help: str = "", **kwargs: Any) -> CompatFlag:
    """A flag of the original scripts that does nothing here."""
    note = "ignored" + (f" ({help})" if help else "")
    return CompatFlag(flag, {**kwargs, "help": note}, ignored=True)


@dataclass(frozen=True)
class Flag:
    """What a config field's flag is (see the module docstring); kept in the field's metadata."""
    help: str = ""
    type: Optional[Callable[[str], Any]] = None
    choices: Optional[Sequence[Any]] = None
    nargs: Any = None
    action: Any = None
    metavar: Optional[str] = None
    spelling: Optional[str] = None        # the flag, when not --<field name with dashes>
    aliases: tuple[CompatFlag, ...] = ()  # the original scripts' other spellings (listed with the compat flags)
    group: Optional[str] = None           # --help group title (None: the main list)
    required: bool = False
    positional: bool = False
    resume: str = "free"
    output: bool = True


def flag(default: Any = None, *, help: str = "", type: Optional[Callable[[str], Any]] = None,
         choices: Optional[Sequence[Any]] = None, nargs: Any = None, action: Any = None,
         metavar: Optional[str] = None, spelling: Optional[str] = None, aliases: Sequence[CompatFlag] = (),
         group: Optional[str] = None, required: bool = False, positional: bool = False, resume: str = "free",
         output: bool = True) -> Any:
    """A config field with its command-line flag. Sequences (``nargs``) default to tuples, as frozen configs hold."""
    if resume not in RESUME:
        raise ValueError(f"resume={resume!r}: use one of {RESUME}")
    meta = Flag(help, type, tuple(choices) if choices is not None else None, nargs, action, metavar, spelling,
                tuple(aliases), group, required, positional, resume, output)
    return field(default=default, metadata={"flag": meta})


def flag_of(f: dataclasses.Field) -> Optional[Flag]:
    return f.metadata.get("flag")


def flag_fields(cls_or_cfg: Any) -> Iterator[tuple[dataclasses.Field, Flag]]:
    """The fields of a config (class or instance) that are command-line flags, in declaration order."""
    for f in dataclasses.fields(cls_or_cfg):
        meta = flag_of(f)
        if meta is not None:
            yield f, meta


def spelling(f: dataclasses.Field, meta: Optional[Flag] = None) -> str:
    """A field's flag as a user types it (``--disc-start``; positionals by their name)."""
    meta = meta or flag_of(f)
    if meta is not None and meta.positional:
        return f.name
    return (meta.spelling if meta is not None and meta.spelling else None) or "--" + f.name.replace("_", "-")


def flag_name(name: str, cls: Any = None) -> str:
    """The flag of field ``name`` (of ``cls`` when given, which knows its spellings)."""
    if cls is not None:
        for f in dataclasses.fields(cls):
            if f.name == name:
                return spelling(f)
    return "--" + name.replace("_", "-")


def fields_where(cls_or_cfg: Any, **facts: Any) -> tuple[str, ...]:
    """Names of the flag fields whose metadata has these values, e.g. ``fields_where(cfg, resume="fixed")``."""
    return tuple(f.name for f, meta in flag_fields(cls_or_cfg)
                 if all(getattr(meta, k) == v for k, v in facts.items()))


def output_values(cfg: Any) -> dict[str, Any]:
    """The values of the fields that change a command's outputs (``output=True``): what its resumable outputs are
    keyed by."""
    return {name: getattr(cfg, name) for name in fields_where(cfg, output=True)}


# ---------------------------------------------------------------------------------------------- the parser
SWITCHES = ("store_true", "store_false", argparse.BooleanOptionalAction)


def _action(f: dataclasses.Field, meta: Flag, default: Any) -> Any:
    """A bool field is a switch: ``--x`` when it is off by default, ``--x`` / ``--no-x`` when on (or unset)."""
    if meta.action is not None:
        return meta.action
    if isinstance(default, bool) or f.type in ("bool", "Optional[bool]"):
        return "store_true" if default is False else argparse.BooleanOptionalAction
    return None


def _help(meta: Flag, default: Any, action: Any) -> str:
    """The help text, with the default appended where it says something and the text does not already
    (argparse appends it itself for ``--x / --no-x`` switches)."""
    text = meta.help
    shown = (default not in (None, False, "", ()) and not meta.required and not meta.positional
             and "default" not in text and action is not argparse.BooleanOptionalAction)
    if shown:
        value = ",".join(map(str, default)) if isinstance(default, tuple) else default
        text = f"{text} (default: {value})".lstrip()
    return text.replace("%", "%%")


def _argparse_kwargs(f: dataclasses.Field, meta: Flag, default: Any) -> dict[str, Any]:
    action = _action(f, meta, default)
    kw: dict[str, Any] = {"help": _help(meta, default, action)}
    if not meta.positional:
        kw.update(dest=f.name, default=list(default) if isinstance(default, tuple) else default)
    if action is not None:
        kw["action"] = action
    if action not in SWITCHES and meta.nargs != 0:  # a flag with a value: its type checks it
        kind = meta.type
        if kind is None:
            sample = default[0] if isinstance(default, tuple) and default else default
            kind = type(sample) if isinstance(sample, (int, float, str)) and not isinstance(sample, bool) else str
        kw["type"] = kind
        if meta.choices is not None:
            kw["choices"] = list(meta.choices)
    for key in ("nargs", "metavar"):
        if getattr(meta, key) is not None:
            kw[key] = getattr(meta, key)
    if meta.required:
        kw["required"] = True
    return kw


def config_parser(cls: type, description: str = "", *, exclude: Sequence[str] = (),
                  defaults: Optional[Mapping[str, Any]] = None,
                  formatter_class: type = argparse.HelpFormatter) -> argparse.ArgumentParser:
    """The argparse parser of config ``cls``: one argument per flag field (``exclude`` leaves some out), in
    declaration order within its group, then the compatibility group (aliases and ``cls.IGNORED``). ``defaults``
    replace fields' defaults (a recipe)."""
    p = argparse.ArgumentParser(description=description, formatter_class=formatter_class)
    groups: dict[Optional[str], Any] = {None: p}
    compat: list[tuple[CompatFlag, dict[str, Any]]] = []
    defaults = dict(defaults or {})
    for f, meta in flag_fields(cls):
        if f.name in exclude:
            continue
        default = defaults.get(f.name, f.default)
        kw = _argparse_kwargs(f, meta, default)
        if meta.group == COMPAT_GROUP:  # a field that exists only as the original scripts' flag
            compat.append((CompatFlag(spelling(f, meta)), kw))
            continue
        if meta.group not in groups:
            groups[meta.group] = p.add_argument_group(meta.group)
        groups[meta.group].add_argument(*([f.name] if meta.positional else [spelling(f, meta)]), **kw)
        shared = {k: v for k, v in kw.items() if k not in ("help", "required")}
        compat += [(row, {**shared, "dest": f.name, **row.kwargs}) for row in meta.aliases]
    compat += [(row, row.kwargs) for row in getattr(cls, "IGNORED", ())]
    if compat:
        group = p.add_argument_group(COMPAT_GROUP, "accepted so that the original command lines run unchanged")
        for row, kw in compat:
            group.add_argument(row.flag, **kw)
    return p


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def ignored_lines(args: argparse.Namespace, table: Sequence[CompatFlag],
                  parser: argparse.ArgumentParser) -> list[str]:
    """One line for each ignored flag given a value other than its default."""
    return [f"{row.flag} is accepted for compatibility and ignored" for row in table
            if row.ignored and getattr(args, row.dest) != parser.get_default(row.dest)]


def recipe_defaults(cls: type, argv: Optional[Sequence[str]], recipes: Mapping[str, Mapping[str, Any]]
                    ) -> dict[str, Any]:
    """The values of the ``--recipe`` named in ``argv`` (none: {}); an unknown name is argparse's one-line error."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe", choices=sorted(recipes), default=None)
    known, _ = pre.parse_known_args(argv)
    if known.recipe is None:
        return {}
    values = dict(recipes[known.recipe])
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:  # a recipe naming a field the config lacks is a bug of the recipe table, not of the user
        raise KeyError(f"recipe {known.recipe!r} sets {unknown}, which {cls.__name__} does not have")
    return {**values, "recipe": known.recipe}


def parse(cls: type, argv: Optional[Sequence[str]] = None, description: str = "", *,
          exclude: Sequence[str] = (), recipes: Optional[Mapping[str, Mapping[str, Any]]] = None,
          defaults: Optional[Mapping[str, Any]] = None, formatter_class: type = argparse.HelpFormatter,
          say: Callable[[str], None] = print, **fixed: Any):
    """Parse ``argv`` into a frozen ``cls``: bad values stop with argparse's one-line error (exit 2), bad
    combinations raise the config's ValueError (one line; entry points exit with it). The ignored compatibility
    flags that were given are reported (rank 0). ``defaults`` replace fields' defaults (an entry point's own, e.g.
    LlamaGen's sampler), a ``--recipe`` replaces those; ``fixed``: field values that are not flags (the preset)."""
    defaults = {**(defaults or {}), **(recipe_defaults(cls, argv, recipes) if recipes else {})}
    parser = config_parser(cls, description, exclude=exclude, defaults=defaults, formatter_class=formatter_class)
    args = parser.parse_args(argv)
    table = getattr(cls, "IGNORED", ())
    for line in ignored_lines(args, table, parser):
        if is_main_process():
            say(line)
    values = {f.name: getattr(args, f.name) for f, _ in flag_fields(cls) if hasattr(args, f.name)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return cls(**values, **fixed)


@contextmanager
def exits_on(*errors: type[BaseException], interrupted: Optional[str] = None) -> Iterator[None]:
    """An entry point's edge: an exception of ``errors`` (one-line messages, raised by library code) ends the
    process with ``error: <message>`` and exit status 1, no traceback; so does Ctrl-C with ``interrupted``."""
    try:
        yield
    except errors as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        if interrupted is None:
            raise
        sys.exit(f"error: {interrupted}")


def config_namespace(cfg: Any, exclude: Sequence[str] = ()) -> argparse.Namespace:
    """A config as the argparse ``Namespace`` that checkpoints store under ``args`` (the original scripts' key)."""
    return argparse.Namespace(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                                 if f.name not in exclude})


def require(condition: bool, message: str) -> None:
    """A config's check: ``message`` (one line, naming the flag) as a ValueError when ``condition`` fails."""
    if not condition:
        raise ValueError(message)


# ---------------------------------------------------------------------------------------------- shared flags
PRECISIONS = ("fp32", "bf16", "fp16")
PRECISION_ALIASES = {"none": "fp32", "no": "fp32", "float32": "fp32", "bfloat16": "bf16", "float16": "fp16",
                     "half": "fp16"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISION_METAVAR = "{" + ",".join(PRECISIONS) + "}"


def precision(text: str) -> str:
    """An argparse type: ``fp32`` / ``bf16`` / ``fp16``; the other spellings in use (``none``, ``float32``,
    ``bfloat16``, ``float16``) are read as these."""
    name = PRECISION_ALIASES.get(text.lower(), text.lower())
    if name not in PRECISIONS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a precision: use one of {', '.join(PRECISIONS)}")
    return name


def precision_flag(default: Optional[str], help: str, **kw: Any) -> Any:
    """A precision field: ``fp32|bf16|fp16`` (the other spellings in use accepted)."""
    return flag(default, type=precision, metavar=PRECISION_METAVAR,
                help=help + "; none, float32, bfloat16, float16 are accepted too", **kw)


def add_precision_argument(parser, flag: str = "--mixed-precision", default: Optional[str] = "bf16",
                           help: str = "") -> None:
    """The same, for the benchmarks' plain parsers."""
    parser.add_argument(flag, type=precision, default=default, metavar=PRECISION_METAVAR,
                        help=(help + "; " if help else "") + "none, float32, bfloat16, float16 are accepted too")


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[precision(name)]


def compile_flag(default: Optional[bool], help: str, **kw: Any) -> Any:
    """A compile switch: ``--x`` / ``--no-x``, the one spelling of every compile switch."""
    return flag(default, action=argparse.BooleanOptionalAction, help=help, **kw)


def add_compile_argument(parser, default: Optional[bool], help: str, flag: str = "--compile") -> None:
    """The same, for the benchmarks' plain parsers."""
    parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help)
