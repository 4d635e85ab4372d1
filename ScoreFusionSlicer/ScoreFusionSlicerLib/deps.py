"""The worker's Python packages, installed on the first Apply the way Slicer asks extensions to.

torch always comes from the PyTorch extension (PyTorchUtils picks the CUDA build that matches the
driver), never from pip. The other requirements (``Resources/requirements.txt``) are minimum
versions only, and a plan that would touch a package Slicer itself ships and depends on (numpy,
SimpleITK, requests) or torch is refused outright. Nothing here runs at import time.
"""

from __future__ import annotations

import importlib.metadata
import re
from typing import Callable

#: The oldest torch the library supports (monai-free; this is the minimum the nets are tested with).
TORCH_MINIMUM = "2.8"
#: Packages pip must never install or replace inside Slicer.
PROTECTED = ("torch", "simpleitk", "numpy", "requests")

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


class DependencyError(RuntimeError):
    """The worker's packages are missing and cannot be (or were not allowed to be) installed."""


def read_requirements(path: str) -> list[str]:
    """The requirement lines of a requirements file, without comments and blank lines."""
    with open(path, encoding="utf-8") as f:
        lines = [line.split("#", 1)[0].strip() for line in f]
    return [line for line in lines if line]


def requirement_name(requirement: str) -> str:
    """The normalised project name of a requirement (``SimpleITK>=2`` -> ``simpleitk``)."""
    m = _NAME.match(requirement)
    if not m:
        raise DependencyError(f"cannot read the requirement {requirement!r}")
    return re.sub(r"[-_.]+", "-", m.group(1)).lower()


def check_plan(requirements: list[str]) -> None:
    """Refuse pins and anything that would replace a package Slicer depends on."""
    for req in requirements:
        name = requirement_name(req)
        if name in PROTECTED:
            raise DependencyError(
                f"{req!r} would replace {name}, which Slicer ships (or, for torch, which only the PyTorch "
                "extension may install); remove it from the requirements"
            )
        if "==" in req:
            raise DependencyError(f"{req!r} pins a version; extensions share one Python, so use a minimum (>=)")


def _satisfied(req: str, version_of: Callable[[str], str]) -> bool:
    from packaging.requirements import Requirement  # bundled with Slicer

    parsed = Requirement(req)
    try:
        installed = version_of(parsed.name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return parsed.specifier.contains(installed, prereleases=True)


def missing_requirements(requirements: list[str],
                         version_of: Callable[[str], str] = importlib.metadata.version) -> list[str]:
    """The requirements that are not installed in a satisfying version (the plan is checked first)."""
    check_plan(requirements)
    return [req for req in requirements if not _satisfied(req, version_of)]


def torch_satisfied(version_of: Callable[[str], str] = importlib.metadata.version) -> bool:
    """Whether torch >= :data:`TORCH_MINIMUM` is installed."""
    return _satisfied(f"torch>={TORCH_MINIMUM}", version_of)


def ensure_torch() -> None:
    """Inside Slicer: install torch through the PyTorch extension when it is missing or too old.

    Raises :class:`DependencyError` when the PyTorch extension is absent or the user declined.
    """
    if torch_satisfied():
        return
    try:
        import PyTorchUtils
    except ImportError:
        raise DependencyError(
            "ScoreFusion needs PyTorch. Install the 'PyTorch' extension from the Extensions Manager, restart "
            "Slicer and press Apply again."
        ) from None
    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True,
                                                           torchVersionRequirement=f">={TORCH_MINIMUM}")
    if torch is None:
        raise DependencyError("PyTorch was not installed; ScoreFusion cannot run without it.")


def ensure_requirements(requirements_path: str, confirm: Callable[[str], bool]) -> bool:
    """Inside Slicer: install the missing requirements after the user agreed; True when something was installed.

    Slicer >= 5.11 has ``slicer.packaging.pip_ensure`` (it asks, shows progress and offers a restart);
    older versions get our own ``confirm(message)`` and ``slicer.util.pip_install``.
    """
    import slicer

    requirements = read_requirements(requirements_path)
    missing = missing_requirements(requirements)
    if not missing:
        return False
    packaging = getattr(slicer, "packaging", None)
    if packaging is not None and hasattr(packaging, "pip_ensure"):
        packaging.pip_ensure(packaging.load_requirements(requirements_path), requester="ScoreFusion",
                             skip_packages=list(PROTECTED))
        return True
    if not confirm("ScoreFusion needs these Python packages, which will be installed now:\n\n"
                   + "\n".join(missing) + "\n\nContinue?"):
        raise DependencyError("the required Python packages were not installed")
    slicer.util.pip_install(missing)
    return True
