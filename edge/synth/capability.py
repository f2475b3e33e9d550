"""Which spec controls an engine honours (docs/contracts.md#spec-and-key).

Every engine declares the optional controls it honours (`Engine.controls`). A node renders
a spec locally only when its engine honours every control in it; otherwise the miss goes
upstream with reason `capability`, and signing or minting a spec that no engine in the
stack honours is refused with 400 `unsupported_control`.

Two controls depend on their values, not only their names: `lang` (an engine with a list of
languages honours only those; one without a list takes any), and `ipa` hints (each symbol
must map to the engine's own phoneme set, edge.synth.hints).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from nearvoice.edge.spec import LANG, Spec
from nearvoice.edge.synth import hints

IpaCheck = Callable[[str], None]
"""Raises hints.Unmappable for a text whose IPA hints the engine cannot say."""


def refused(
    spec: Spec,
    controls: Iterable[str],
    languages: Iterable[str] = (),
    ipa: IpaCheck | None = None,
) -> str | None:
    """The first control of `spec` not honoured (None: all are), by name."""
    honoured = frozenset(controls)
    for control in sorted(spec.controls()):
        if control not in honoured:
            return control
    known = frozenset(languages)
    if spec.lang is not None and known and not _speaks(known, spec.lang):
        return LANG
    if ipa is not None and hints.IPA in spec.controls():
        try:
            ipa(spec.text)
        except hints.Unmappable:
            return hints.IPA
    return None


def _speaks(languages: frozenset[str], tag: str) -> bool:
    """`en-US` is spoken by an engine that lists `en-US`; a bare `en` by one that lists
    any English (`en-US`), since the text then says no more than "English"."""
    return tag in languages or any(known.split("-")[0] == tag for known in languages)
