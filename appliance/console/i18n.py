"""The console's languages: gettext catalogs (``locales/<lang>/LC_MESSAGES/messages.po``) and locale formatting.

The ``.po`` files are the source of truth and are compiled in memory when the daemon starts, so there is
no build step and no ``.mo`` file to forget. English is the language the strings are written in; a
string missing from a catalog shows in English rather than not at all. To add or change strings::

    make messages   # extracts every _("...") from the code and templates into messages.pot and
                    # merges it into each catalog; then translate the new entries in the .po files

Dates, times and numbers are formatted with Babel for the user's locale (``zh`` -> ``zh_Hans_CN``).
"""

from __future__ import annotations

import gettext
import io
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from functools import cache
from pathlib import Path
from typing import Literal

from babel import Locale
from babel.dates import format_datetime, format_time, format_timedelta, get_timezone
from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po
from babel.numbers import format_decimal, format_percent

LOCALES_DIR = Path(__file__).parent / "locales"
Language = Literal["en", "zh"]
LANGUAGES: dict[Language, str] = {"en": "English", "zh": "简体中文"}  # each in its own language
DEFAULT_LANGUAGE: Language = "en"
_BABEL_LOCALE: dict[Language, str] = {"en": "en_GB", "zh": "zh_Hans_CN"}
_HTML_LANG: dict[Language, str] = {"en": "en", "zh": "zh-Hans"}


@cache
def translations(language: str) -> gettext.NullTranslations:
    """The catalog for ``language`` (English: none, the strings are English)."""
    po = LOCALES_DIR / language / "LC_MESSAGES" / "messages.po"
    if language == DEFAULT_LANGUAGE or not po.exists():
        return gettext.NullTranslations()
    with po.open("rb") as f:
        catalog = read_po(f, locale=language)
    buf = io.BytesIO()
    write_mo(buf, catalog)
    buf.seek(0)
    return gettext.GNUTranslations(buf)


def pick_language(wanted: str | None, accept_language: str = "") -> Language:
    """The user's language if known, else the first supported one the browser asks for, else English."""
    if wanted in LANGUAGES:
        return wanted
    for part in accept_language.split(","):
        tag = part.split(";")[0].strip().lower()
        if tag.startswith("zh"):
            return "zh"
        if tag.startswith("en"):
            return "en"
    return DEFAULT_LANGUAGE


@dataclass(frozen=True, slots=True)
class Localizer:
    """Everything a page needs to speak one language: gettext and locale-aware formatting."""

    language: Language
    timezone: tzinfo = UTC

    @property
    def html_lang(self) -> str:
        return _HTML_LANG[self.language]

    @property
    def locale(self) -> Locale:
        return Locale.parse(_BABEL_LOCALE[self.language])

    def gettext(self, message: str) -> str:
        return translations(self.language).gettext(message)

    def ngettext(self, singular: str, plural: str, n: int) -> str:
        return translations(self.language).ngettext(singular, plural, n)

    def datetime(self, ts: float | None, form: Literal["short", "medium"] = "medium") -> str:
        if not ts:
            return "–"
        return format_datetime(datetime.fromtimestamp(ts, UTC), form, tzinfo=self.timezone, locale=self.locale)

    def time(self, ts: float | None) -> str:
        if not ts:
            return "–"
        return format_time(datetime.fromtimestamp(ts, UTC), "medium", tzinfo=self.timezone, locale=self.locale)

    def ago(self, seconds: float | None) -> str:
        """"3 minutes" / "3分钟": a duration in words (the template adds "ago")."""
        if seconds is None:
            return "–"
        return format_timedelta(timedelta(seconds=max(0.0, seconds)), threshold=1.0, locale=self.locale)

    def number(self, value: float | None, digits: int = 0) -> str:
        if value is None:
            return "–"
        return format_decimal(value, format=f"#,##0.{'0' * digits}" if digits else "#,##0", locale=self.locale)

    def score(self, value: float | None) -> str:
        """A model's score: a percentage when it is a probability (0..1), else the number; none for 0 (reported)."""
        if not value:
            return ""
        return self.percent(value) if 0 <= value <= 1 else self.number(value, 2)

    def percent(self, fraction: float | None) -> str:
        return "–" if fraction is None else format_percent(fraction, locale=self.locale)

    def bytes(self, n: float | None) -> str:
        if n is None:
            return "–"
        for unit in ("B", "KB", "MB", "GB", "TB"):
            if abs(n) < 1024 or unit == "TB":
                return f"{self.number(n, 0 if unit == 'B' else 1)} {unit}"
            n /= 1024
        return ""  # not reached


def local_timezone() -> tzinfo:
    """The box's own time zone (site staff read local time): the ``timezone`` setting (which the daemon puts in
    ``TZ``), else the system's, else UTC."""
    try:
        return get_timezone(os.environ.get("TZ") or None)
    except LookupError:
        return UTC
