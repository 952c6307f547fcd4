"""Which levers a run gets: the user's choice where there is one, else the device's
default, less what this install's stack lacks (the memory levers are sized later, by
``bench/recipe/lever_sizing.py``, once the run's micro-batches are known)."""

from __future__ import annotations

from dataclasses import replace

from bench.recipe.levers import (
    LEVER_BASES,
    LEVER_DECLARATIONS,
    LEVER_NEEDS,
    STOCK,
    LeverRequest,
    Levers,
    lever_option,
)


def without_unavailable(request: LeverRequest, missing: dict[str, str]) -> tuple[LeverRequest, list[str]]:
    """``request`` with each lever whose needed API is ``missing`` (path -> why) held at
    stock, as if the user had asked for it, so that neither the defaults nor the memory
    model choose it; and, for one the user turned on, why it cannot run (a preflight
    problem). ``--stock`` holds every lever at stock already."""
    if request.stock:
        return request, []
    held, problems = {}, []
    for name, path in LEVER_NEEDS.items():
        if path not in missing:
            continue
        if getattr(request, name) not in (None, getattr(STOCK, name)):
            problems.append(f"{lever_option(name)} needs {path}: {missing[path]}")
        held[name] = getattr(STOCK, name)
    return replace(request, **held), problems


def resolve_levers(
    request: LeverRequest, device: str, precision: str, supports_sdpa: bool | None = None
) -> tuple[Levers, list[str]]:
    """The levers of this run but the memory levers' defaults, and, for choices that
    cannot apply, why (preflight problems). The memory levers (MEMORY_LEVERS) keep the
    user's value or the stock one here; ``size_memory_levers`` chooses their defaults once
    the run's micro-batches are known.

    Defaults: each lever's declared GPU default on GPUs, stock's on CPU (a functional
    check, not a benchmark); dequantization only for NF4 on GPUs, SDPA attention only
    where the LLM folder's code has it (``supports_sdpa``, from preflight's import of that
    code; None: not known), and a lever that changes another's work (LEVER_BASES) only
    with that one.
    """
    if request.stock:
        asked = [value for name, value in vars(request).items() if name != "stock"]
        return STOCK, (
            ["--stock (and --float32-reference) turn every lever off; leave out the lever options"]
            if any(v is not None for v in asked)
            else []
        )
    problems = []
    if request.dequantize_nf4 and not dequantization_applies(device, precision):
        problems.append("--dequantize-nf4 applies to --precision nf4 on GPUs")
    if request.sdpa_attention and supports_sdpa is False:
        problems.append("--sdpa-attention: the LLM folder's model code has no SDPA attention (_supports_sdpa)")
    levers = Levers(**{name: _asked_or(getattr(request, name), _default(name, device)) for name in LEVER_DECLARATIONS})
    # what cannot apply here is off, asked or not (asked, it is a problem above)
    levers = replace(
        levers,
        dequantize_nf4=levers.dequantize_nf4 and dequantization_applies(device, precision),
        sdpa_attention=levers.sdpa_attention and bool(supports_sdpa),
    )
    for name, base in LEVER_BASES.items():
        if getattr(request, name) and not getattr(levers, base):
            problems.append(f"{lever_option(name)} changes the work of {lever_option(base)}, which is off here")
    return replace(
        levers, **{name: getattr(levers, name) and getattr(levers, base) for name, base in LEVER_BASES.items()}
    ), problems


def dequantization_applies(device: str, precision: str) -> bool:
    return device == "cuda" and precision == "nf4"


def tokenized_cache_on(request: LeverRequest, device: str) -> bool:
    """Whether the run keeps the tokenized dataset (decided before the other levers:
    preflight starts its build as soon as it has read the JSON)."""
    return not request.stock and _asked_or(request.tokenized_cache, _default("tokenized_cache", device))


def _default(name: str, device: str):
    """A lever's default before the memory model: its GPU default on GPUs, else stock's."""
    declaration = LEVER_DECLARATIONS[name]
    on_gpus = declaration.metadata["on_gpus"]
    return on_gpus if device == "cuda" and on_gpus is not None else declaration.default


def _asked_or(asked, default):
    """The user's choice where there is one (``None``: none was made)."""
    return default if asked is None else asked
