"""The console's Chinese catalog covers every string the console shows, with its placeholders intact."""

from __future__ import annotations

import re
from pathlib import Path

from babel.messages.extract import DEFAULT_KEYWORDS, extract_from_dir
from babel.messages.pofile import read_po

from appliance.console.i18n import LOCALES_DIR, Localizer, pick_language, translations

ROOT = Path(__file__).resolve().parents[1]
PLACEHOLDER = re.compile(r"\{[a-z_]+\}|%\([a-z_]+\)[sd]")


def extracted() -> set[str]:
    method_map = [("appliance/console/**.py", "python"), ("appliance/console/templates/**.html", "jinja2")]
    keywords = {**DEFAULT_KEYWORDS, "N_": None}
    found = set()
    for _file, _line, message, _comments, _context in extract_from_dir(ROOT, method_map, keywords=keywords):
        found.add(message if isinstance(message, str) else message[0])
    return found


def catalog() -> dict[str, str]:
    with (LOCALES_DIR / "zh" / "LC_MESSAGES" / "messages.po").open("rb") as f:
        po = read_po(f, locale="zh")
    return {str(m.id if isinstance(m.id, str) else m.id[0]): m.string if isinstance(m.string, str) else m.string[0]
            for m in po if m.id}


def test_every_console_string_is_in_the_chinese_catalog_and_translated() -> None:
    strings, zh = extracted(), catalog()
    assert len(strings) > 150
    missing = sorted(strings - zh.keys())
    assert not missing, f"run `make messages` and translate: {missing}"
    empty = sorted(k for k in strings if not zh[k])
    assert not empty, f"untranslated in the zh catalog: {empty}"


def test_placeholders_survive_translation() -> None:
    for msgid, msgstr in catalog().items():
        assert sorted(PLACEHOLDER.findall(msgid)) == sorted(PLACEHOLDER.findall(msgstr)), msgid


def test_language_choice() -> None:
    assert pick_language("zh") == "zh" and pick_language("en", "zh-CN") == "en"
    assert pick_language(None, "zh-TW,zh;q=0.8,en;q=0.5") == "zh"
    assert pick_language("fr", "de-DE,fr") == "en", "an unsupported language falls back to English"
    assert translations("zh").gettext("Alerts") != "Alerts"
    assert translations("en").gettext("Alerts") == "Alerts"


def test_numbers_and_sizes_follow_the_locale() -> None:
    en, zh = Localizer("en"), Localizer("zh")
    assert en.number(1234567.891, 1) == "1,234,567.9" and zh.number(1234567.891, 1) == "1,234,567.9"
    assert en.bytes(3 * 1024**3) == "3.0 GB"
    assert "分钟" in zh.ago(180) and "minute" in en.ago(180)
    assert en.datetime(None) == "–"
