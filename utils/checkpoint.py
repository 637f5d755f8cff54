"""Checkpoint files: atomic writes, safe reads, weights-only files and Hugging Face Hub names.

Every checkpoint this project reads goes through ``load_file``, so every entry point (the Python loaders, the
evaluation, extraction and sampling scripts, training resume) follows the same rules:

* ``hf://owner/repo[@revision]/path/to/file`` names a file on the Hugging Face Hub; it is downloaded once into
  the Hugging Face cache (``huggingface_hub``; ``HF_HOME`` / ``HF_HUB_CACHE``) and read from there, also offline.
* A safetensors file (weights and a JSON config, no pickle at all) is read as ``{<weights key>: state dict,
  "config": dict}``, the shape of a ``.pt`` checkpoint, so everything downstream treats both alike.
* Anything else is read with ``torch.load(weights_only=True)``: tensors, containers and numbers, plus
  ``ALLOWED_GLOBALS``, exactly the other objects released and project checkpoints hold. A pickle that names
  anything else is refused before any of it runs (a checkpoint from the internet could otherwise execute
  code), with one line naming the offending global and the opt-in for files the user trusts: ``--unsafe-load``
  on the command line or ``FQGAN_UNSAFE_LOAD=1``.

Writes are atomic: a checkpoint goes to a temporary file in the destination folder, is flushed to disk, then
renamed over the destination, so a crash (or a full disk) mid-write never leaves a truncated file where a good
one was.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import pickle
import re
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping, Optional, TypeVar
from urllib.parse import unquote

import torch

from utils.flags import flag

WEIGHT_KEYS = ("ema", "model", "state_dict")  # where checkpoints of this family keep their weights
EMA_FIRST = WEIGHT_KEYS  # what the original reconstruction evaluation reads
MODEL_FIRST = ("model", "state_dict", "ema")  # what the original code extraction and sampling read
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # added by DDP / FSDP wrappers and torch.compile
UNSAFE_LOAD_ENV = "FQGAN_UNSAFE_LOAD"
HF_SCHEME = "hf://"
SAVE_FORMATS = ("pt", "safetensors")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message is one line naming the file and what is wrong."""


# ------------------------------------------------------------------------------------------------------------
# What a weights-only load accepts besides tensors, containers and numbers
# ------------------------------------------------------------------------------------------------------------
def _allowed_globals() -> list:
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return [
        # "args": the original training scripts, and ours, save their argparse Namespace.
        argparse.Namespace,
        # "resume" -> "rng" -> "numpy": np.random.get_state() carries the MT19937 key, a uint32 array. An array
        # pickles as _reconstruct(ndarray, ...) plus a dtype whose class must be allowed to take its state.
        # numpy 1.x files name _reconstruct under numpy.core, numpy 2 under numpy._core: both are accepted.
        (_reconstruct, "numpy._core.multiarray._reconstruct"),
        (_reconstruct, "numpy.core.multiarray._reconstruct"),
        np.ndarray, np.dtype, type(np.dtype(np.uint32)),
    ]


ALLOWED_GLOBALS = _allowed_globals()


def _global_name(g) -> str:
    return g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}"


ALLOWED_GLOBAL_NAMES = frozenset(_global_name(g) for g in ALLOWED_GLOBALS)


def unsafe_load_allowed() -> bool:
    """Whether the user opted in to full-pickle loads of files refused by the weights-only loader."""
    return os.environ.get(UNSAFE_LOAD_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


class _AllowUnsafeLoad(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, True)
        # The loaders read the opt-in from the environment, so it reaches them wherever they are called (the
        # training loops' resume included) without threading a flag through every function.
        os.environ[UNSAFE_LOAD_ENV] = "1"


UNSAFE_LOAD_HELP = ("read checkpoint files that hold Python objects beyond weights, which runs code inside them; "
                    f"only for files you trust (same as {UNSAFE_LOAD_ENV}=1)")


def unsafe_load_flag(**kw: Any) -> Any:
    """The config field of ``--unsafe-load``: the command-line form of ``FQGAN_UNSAFE_LOAD=1`` (it changes what may
    be read, never what is computed)."""
    return flag(False, action=_AllowUnsafeLoad, nargs=0, help=UNSAFE_LOAD_HELP, output=False, **kw)


def add_unsafe_load_argument(parser: argparse.ArgumentParser) -> None:
    """``--unsafe-load`` on a plain parser (the benchmarks')."""
    parser.add_argument("--unsafe-load", action=_AllowUnsafeLoad, nargs=0, default=False, help=UNSAFE_LOAD_HELP)


# ------------------------------------------------------------------------------------------------------------
# Hugging Face Hub names
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HubFile:
    """A file named ``hf://[datasets/|spaces/]owner/repo[@revision]/path/in/repo``."""
    repo_id: str
    filename: str
    revision: Optional[str] = None
    repo_type: str = "model"

    @classmethod
    def parse(cls, name: str) -> "HubFile":
        parts = name[len(HF_SCHEME):].split("/")
        repo_type = "model"
        if parts[0] in ("datasets", "spaces"):
            repo_type, parts = parts[0][:-1], parts[1:]
        if len(parts) < 3 or not all(parts):
            raise CheckpointError(f"{name}: not a Hugging Face file name; expected hf://owner/repo[@revision]/file, "
                                  f"e.g. hf://ZechenBai/FQGAN/fqgan_dual_ds16.pt")
        repo, at, revision = parts[1].partition("@")
        if not repo or (at and not unquote(revision)):  # "repo@" would silently mean main
            raise CheckpointError(f"{name}: {'an empty revision after' if repo else 'no repository name before'} "
                                  f"'@'; expected hf://owner/repo[@revision]/file, e.g. "
                                  f"hf://ZechenBai/FQGAN@main/fqgan_dual_ds16.pt")
        return cls(f"{parts[0]}/{repo}", "/".join(parts[2:]), unquote(revision) or None, repo_type)

    @property
    def url(self) -> str:
        kind = {"model": "", "dataset": "datasets/", "space": "spaces/"}[self.repo_type]
        return f"https://huggingface.co/{kind}{self.repo_id}/resolve/{self.revision or 'main'}/{self.filename}"


def _first_line(e: BaseException) -> str:
    """``Type: first line of the message`` (libraries' messages often run over many lines)."""
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _download(name: str) -> Path:
    hub = HubFile.parse(name)
    try:
        from huggingface_hub import errors, hf_hub_download  # (imports its logging set-up before the line below)
    except ImportError:
        raise CheckpointError(f"{name}: reading hf:// names needs huggingface_hub (pip install huggingface_hub), "
                              f"or download {hub.url} and pass its local path") from None
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # its retry warnings would precede the one line that says what to do
    try:
        return Path(hf_hub_download(hub.repo_id, hub.filename, revision=hub.revision, repo_type=hub.repo_type))
    except errors.LocalEntryNotFoundError:  # not cached, and offline (HF_HUB_OFFLINE) or no connection
        from huggingface_hub import constants

        raise CheckpointError(
            f"{name}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and the Hub cannot be reached"
            f"{' (HF_HUB_OFFLINE is set)' if constants.HF_HUB_OFFLINE else ''}; download {hub.url} on a "
            f"connected machine and pass its local path, or fill the cache there (hf download {hub.repo_id} "
            f"{hub.filename}) and copy it to this one") from None
    except errors.RepositoryNotFoundError:
        raise CheckpointError(f"{name}: no repository {hub.repo_id} on the Hugging Face Hub (or it is private or "
                              f"gated: log in with `hf auth login`)") from None
    except errors.RevisionNotFoundError:
        raise CheckpointError(f"{name}: repository {hub.repo_id} has no revision {hub.revision}") from None
    except errors.EntryNotFoundError:
        raise CheckpointError(f"{name}: repository {hub.repo_id} has no file {hub.filename}") from None
    except (errors.HfHubHTTPError, OSError, ValueError) as e:
        raise CheckpointError(f"{name}: download from the Hugging Face Hub failed ({_first_line(e)})") from None
    finally:
        hub_log.setLevel(level)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The local file behind a checkpoint name: an ``hf://`` name is downloaded (once) into the Hugging Face
    cache; a path must exist."""
    if str(path).startswith(HF_SCHEME):
        return _download(str(path))
    local = Path(path)
    if local.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file")
    if not local.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    return local


# ------------------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------------------
def is_safetensors(path: Path) -> bool:
    """A safetensors file starts with its JSON header's length (8 bytes), then ``{``; a torch file with a zip
    (``PK``) or pickle (``0x80``) signature. Deciding by content, not by name, reads a weights file whatever it
    is called, and reports a truncated one as such."""
    with open(path, "rb") as f:
        return f.read(9)[8:9] == b"{"


def _load_safetensors(local: Path, name, map_location) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(local, framework="pt", device=str(map_location)) as f:
            meta = f.metadata() or {}
            weights = {k: f.get_tensor(k) for k in f.keys()}
        ckpt: dict[str, Any] = {meta.get("weights") or "model": weights}
        if "config" in meta:
            ckpt["config"] = json.loads(meta["config"])
    except Exception as e:  # truncated file, bad header, config that is not JSON ...
        raise CheckpointError(f"{name}: not a readable safetensors file ({_first_line(e)})") from None
    return ckpt


_REFUSED_RE = (re.compile(r"GLOBAL (\S+) (?:was not an allowed global|whose module)"),
               re.compile(r"got <class '([^']+)'>"))


def _refused_globals(local: Path, error: Exception) -> list[str]:
    """The globals a weights-only load refused, read from the file without running it."""
    try:
        found = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(local)
                 if g not in ALLOWED_GLOBAL_NAMES]
    except Exception:  # pre-zip (legacy) format: the loader's message is all there is
        found = []
    return found or [m.group(1) for r in _REFUSED_RE for m in [r.search(str(error))] if m]


def _weights_only_detail(error: Exception) -> str:
    lines = [s.strip() for s in str(error).splitlines()]
    return next((s for s in lines if s.startswith(("Unsupported", "Trying", "Can only"))), _first_line(error))


def load_file(path: str | os.PathLike, map_location: str | torch.device = "cpu",
              unsafe_load: Optional[bool] = None) -> Any:
    """Read a checkpoint (a path or an ``hf://`` name; torch or safetensors) safely; one-line CheckpointError
    for a missing, unreadable or refused file. ``unsafe_load`` (default: ``FQGAN_UNSAFE_LOAD`` /
    ``--unsafe-load``) reads a refused file with the full unpickler, for files the user trusts."""
    local = resolve_checkpoint(path)
    if is_safetensors(local):
        return _load_safetensors(local, path, map_location)
    opt_in = f"--unsafe-load or {UNSAFE_LOAD_ENV}=1"
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            return torch.load(local, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # the weights-only unpickler stopped before building anything else
        refused = _refused_globals(local, e)
        if not (unsafe_load_allowed() if unsafe_load is None else unsafe_load):
            if refused:
                raise CheckpointError(f"{path}: refused: it holds {', '.join(refused)}, which is not weights and "
                                      f"could run code when read; if you trust this file, load it with {opt_in}") \
                    from None
            raise CheckpointError(f"{path}: not a readable torch checkpoint (weights-only loader: "
                                  f"{_weights_only_detail(e)}); if it is one you trust, try {opt_in}") from None
        print(f"warning: {path}: read with the full unpickler ({opt_in}), which lets it run "
              f"{', '.join(refused) or 'whatever it holds'}", file=sys.stderr)
    except Exception as e:  # corrupt zip, truncated download, not a torch file ...
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({_first_line(e)})") from None
    try:
        return torch.load(local, map_location=map_location, weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({_first_line(e)})") from None


def strip_wrapper_prefixes(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        changed = True
        while changed:
            changed = False
            for p in WRAPPER_PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def extract_weights(ckpt: Any, path: str | os.PathLike = "<checkpoint>",
                    prefer: tuple[str, ...] = WEIGHT_KEYS) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict inside a checkpoint and the key it came from (``"ema"``, ``"model"``, ``"state_dict"``,
    or ``""`` for a bare state dict), with DDP / compile prefixes removed."""
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{path}: expected a dict of weights, found {type(ckpt).__name__}")
    for key in prefer:
        if isinstance(ckpt.get(key), Mapping) and ckpt[key]:
            return strip_wrapper_prefixes(ckpt[key]), key
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return strip_wrapper_prefixes(ckpt), ""
    raise CheckpointError(f"{path}: no weights under any of {list(prefer)} (top-level keys: {sorted(ckpt)[:10]})")


def weight_preference(ema: bool) -> tuple[str, ...]:
    """The weights an extraction / sampling entry point reads: "model" (as the original does, falling back to
    what the file has), or with ``--ema`` the EMA weights and nothing else."""
    return ("ema",) if ema else MODEL_FIRST


C = TypeVar("C")


def stored_config(cls: type[C], ckpt: Any, path: str | os.PathLike, what: str, **overrides) -> Optional[C]:
    """The config dataclass a checkpoint carries under ``"config"`` (``dataclasses.asdict`` of ``cls``), with
    ``overrides`` applied; None if the file has none (released files: infer from the weights instead)."""
    if not isinstance(ckpt, Mapping) or ckpt.get("config") is None:
        return None
    stored = ckpt["config"]
    if not isinstance(stored, Mapping):
        raise CheckpointError(f"{path}: its 'config' is a {type(stored).__name__}, not a dict of fields")
    unknown = sorted(set(stored) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise CheckpointError(f"{path}: not {what}: its stored config has fields {cls.__name__} does not know "
                              f"({', '.join(unknown[:6])})")
    try:
        return cls(**{**stored, **overrides})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its stored config does not describe a model that can be built ({e})") \
            from None


@contextmanager
def noting_stored_config(config_stored: bool):
    """Loading weights into a model built from the config stored in the file: a mismatch then means the file
    contradicts itself, so the error says where the config came from (one wording for every model)."""
    try:
        yield
    except CheckpointError as e:
        if not config_stored:
            raise
        raise CheckpointError(f"{e} (the model was built from the config stored in the file)") from None


@dataclass(frozen=True)
class LoadedFrom:
    """Where a loaded model came from; entry points print it, so a run says which weights it used."""
    path: str
    weights: str  # the checkpoint entry: "model", "ema", "state_dict", or "" for a bare state dict
    config_stored: bool  # built from the config saved in the file (else inferred from key names and shapes)
    note: str = ""  # how what the weights cannot tell was decided, for an inferred config

    def __str__(self) -> str:
        weights = f"'{self.weights}' weights" if self.weights else "a bare state dict"
        config = "its stored config" if self.config_stored else "config inferred from the weights"
        return f"{self.path} ({weights}, {config}{'; ' + self.note if self.note else ''})"


# ------------------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------------------
def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None], size: int) -> Path:
    """Write through ``write`` to a temporary file beside ``path``, then rename it over ``path``. ``size`` bytes
    (an estimate) are reserved first, so a full disk is one line before anything is written; the file gets the
    permissions ``open`` would give it (the umask), not mkstemp's 0600."""
    from utils.runfiles import reserve_space, umask_mode

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, umask_mode())
        reserve_space(fd, size, path)
        with os.fdopen(fd, "wb") as f:
            try:
                write(f)
                f.truncate(f.tell())  # give back what the estimate reserved beyond the end
                f.flush()
                os.fsync(f.fileno())
            except (OSError, RuntimeError) as e:  # torch's "unexpected pos", ENOSPC past the estimate ...
                raise OSError(f"{path}: writing failed after {f.tell():,} bytes ({_first_line(e)}); "
                              f"{path} itself is untouched") from None
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def saved_size(obj: Any) -> int:
    """About how many bytes ``torch.save(obj)`` writes: its tensors' storages (each once) plus room for the
    pickled structure and the zip records."""
    seen, total, stack = set(), 0, [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            storage = x.untyped_storage()
            if storage.data_ptr() not in seen or storage.nbytes() == 0:
                seen.add(storage.data_ptr())
                total += storage.nbytes() + 128
        elif isinstance(x, Mapping):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    return total + (1 << 20)


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda f: torch.save(obj, f), saved_size(obj))


def save_weights_file(path: str | os.PathLike, weights: Mapping[str, torch.Tensor],
                      config: Optional[Mapping[str, Any]] = None, which: str = "model") -> Path:
    """A safetensors file: the weights, plus metadata ``weights`` (which entry of a checkpoint they were:
    "model" / "ema") and ``config`` (JSON of the config dataclass), atomically."""
    from safetensors.torch import save

    meta = {"format": "pt", "weights": which or "model"}
    if config is not None:
        meta["config"] = json.dumps(config)
    data = save({k: v.detach().to("cpu").contiguous() for k, v in weights.items()}, metadata=meta)
    return atomic_write(path, lambda f: f.write(data), len(data))


def write_checkpoint(ckpt: Mapping[str, Any], path: str | os.PathLike, save_format: Optional[str] = None,
                    weights: str = "model") -> Path:
    """Write a checkpoint dict atomically as a torch file (everything in it) or, with ``save_format``
    "safetensors" (default: by the file's suffix), as a weights-only file: ``ckpt[weights]`` and
    ``ckpt["config"]``, nothing else (no optimizer or resume state)."""
    save_format = save_format or ("safetensors" if Path(path).suffix == ".safetensors" else "pt")
    if save_format not in SAVE_FORMATS:
        raise ValueError(f"unknown save format {save_format!r}; choose from {list(SAVE_FORMATS)}")
    if save_format == "pt":
        return atomic_save(dict(ckpt), path)
    sd, key = extract_weights(ckpt, path, (weights,))
    return save_weights_file(path, sd, ckpt.get("config"), key)


# ------------------------------------------------------------------------------------------------------------
def _short(keys, limit: int = 6) -> str:
    keys = list(keys)
    s = ", ".join(keys[:limit])
    return s + (f" ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def check_state_dict(expected: Mapping[str, torch.Size], found: Mapping[str, torch.Tensor], path, what: str,
                     optional: tuple[str, ...] = ()) -> None:
    """Raise one CheckpointError naming missing, unexpected and mis-shaped keys, if there are any.
    Keys starting with one of ``optional`` may be absent."""
    missing = [k for k in expected if k not in found and not k.startswith(optional)]
    unexpected = [k for k in found if k not in expected]
    shapes = [f"{k} {tuple(found[k].shape)} in file vs {tuple(expected[k])} in model"
              for k in expected if k in found and tuple(found[k].shape) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"missing keys: {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_short(unexpected)}")
    if shapes:
        problems.append(f"mis-shaped keys: {_short(shapes, 3)}")
    if problems:
        raise CheckpointError(f"{path}: does not fit {what}: " + "; ".join(problems))
