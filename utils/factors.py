"""The factor vocabulary shared by the tokenizer and the generator: preset names, factor counts, factor names.

A tokenizer's factors are named (``vis``, ``sem``, ...) and ordered, visual first; the generator only knows how
many there are, and labels its per-factor losses with the same names. The presets are the paper's two and
the single codebook it compares with:

    single  1 factor    vis
    dual    2 factors   vis, sem
    triple  3 factors   vis, sem_mid, sem_high

Any other count is allowed ("a 4-factor tokenizer"); its factors are then named by the tokenizer config, and
the generator calls them ``factor1``, ``factor2``, ...

``single`` is one codebook: LlamaGen's VQ tokenizer (``vq_ds16_c2i.pt``) and its GPT generators are this
project's tokenizer and FAR with one factor (see tokenizer.models.fqgan and autoregressive.models.far).
"""
from __future__ import annotations

PRESET_FACTORS: dict[str, tuple[str, ...]] = {
    "single": ("vis",),
    "dual": ("vis", "sem"),
    "triple": ("vis", "sem_mid", "sem_high"),
}


def preset_name(num_factors: int) -> str:
    """``single`` / ``dual`` / ``triple`` for the presets' counts, else ``<n>-factor`` (messages, descriptions)."""
    for name, factors in PRESET_FACTORS.items():
        if len(factors) == num_factors:
            return name
    return f"{num_factors}-factor"


def preset_of(names) -> str | None:
    """The preset whose factors are exactly ``names`` (in order), if any."""
    names = tuple(names)
    return next((p for p, fs in PRESET_FACTORS.items() if fs == names), None)


def factor_count(preset: int | str) -> int:
    """A factor count given as a number or a preset name."""
    if isinstance(preset, int):
        return preset
    if preset in PRESET_FACTORS:
        return len(PRESET_FACTORS[preset])
    try:
        return int(preset)
    except ValueError:
        raise ValueError(f"unknown factor preset {preset!r}; choose from {sorted(PRESET_FACTORS)} or give a count") \
            from None


def factor_names(num_factors: int) -> tuple[str, ...]:
    """Names of the factors of a count: the preset's, or ``factor1`` ... ``factorN``."""
    for factors in PRESET_FACTORS.values():
        if len(factors) == num_factors:
            return factors
    return tuple(f"factor{i + 1}" for i in range(num_factors))
