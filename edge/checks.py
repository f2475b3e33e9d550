"""Bounds on settings, checked when a node starts rather than discovered when a request
breaks: each settings dataclass has a `validate()` built from these helpers, and
`edge.config.NodeConfig.validate` runs them all, naming the section of the first setting
out of bounds in a one-line `ConfigError`."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A setting of the wrong type or out of its range: one line, naming the setting."""


def require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {message}")


def at_least(settings: Any, name: str, low: float) -> None:
    value = getattr(settings, name)
    require(value >= low, name, f"must be at least {low}, not {value!r}")


def positive(settings: Any, name: str) -> None:
    value = getattr(settings, name)
    require(value > 0, name, f"must be greater than 0, not {value!r}")


def between(settings: Any, name: str, low: float, high: float) -> None:
    value = getattr(settings, name)
    require(low <= value <= high, name, f"must be in {low}..{high}, not {value!r}")


def one_of(settings: Any, name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(settings, name)
    require(value in allowed, name, f"must be one of {', '.join(allowed)}, not {value!r}")


def http_url(name: str, value: str) -> None:
    require(
        value.startswith(("http://", "https://")) and len(value) > len("https://"),
        name,
        f"must be an http:// or https:// URL, not {value!r}",
    )


def in_section(section: str, settings: Any) -> None:
    """Runs `settings.validate()`, naming `section` in its error."""
    try:
        settings.validate()
    except ConfigError as exc:
        raise ConfigError(f"[{section}] {exc}") from None
