"""Write the settings part of docs/configuration.md from the settings table.

    python scripts/config_docs.py          # rewrite the file
    python scripts/config_docs.py --check  # exit 1 if it is out of date

The text before the first section heading is kept as written; everything from
``## Server`` on is generated from ``forkserve.config.SETTINGS``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from forkserve.config import _NOT_IN_FILES, ACTIONS, SECTION_TITLES, SETTINGS, Setting  # noqa: E402
from forkserve.converters import octal_mode  # noqa: E402

DOC = ROOT / "docs" / "configuration.md"
HOOKS_INTRO = (
    "Hooks are callables defined in a Python config file; there is no flag or "
    "environment variable.\nUnset hooks are not called.\n\n"
)


def _default(setting: Setting) -> str:
    value: Any = setting.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if setting.type is octal_mode:
        return f"`{oct(value)}`"
    if isinstance(value, tuple):
        return f"`{','.join(value)}`" if value else "`none`"
    if isinstance(value, float) and value.is_integer():
        return f"`{int(value)}`"
    if value == "":
        return '`""`'
    return f"`{value}`"


def _flag_line(setting: Setting) -> str:
    flags = ", ".join(f"`{flag}`" for flag in setting.flags)
    if setting.choices:
        flags += " " + "|".join(setting.choices)
    elif setting.metavar and not setting.is_flag:
        flags += f" {setting.metavar}"
    if setting.multiple:
        flags += " (repeatable)"
    return f"- Flag: {flags}"


def render_setting(setting: Setting) -> str:
    lines = [f"### `{setting.name}`", ""]
    if setting.section == "hooks":
        lines += [f"- Config key: `{setting.name}`", f"- Default: {_default(setting)}"]
        return "\n".join([*lines, "", setting.help, ""])
    if setting.flags:
        lines.append(_flag_line(setting))
    if setting.name in ACTIONS:
        lines.append("- Environment: none; give it as an option (also in `FORKSERVE_CMD_ARGS`)")
    else:
        lines.append(f"- Environment: `{setting.env_var}`")
    if setting.name in ACTIONS:
        lines.append("- Config key: none")
    elif setting.name in _NOT_IN_FILES:
        lines.append("- Config key: none (command line and environment only)")
    else:
        lines.append(f"- Config key: `{setting.name}`")
    if setting.choices:
        lines.append("- Choices: " + ", ".join(f"`{c}`" for c in setting.choices))
    lines.append(f"- Default: {_default(setting)}")
    return "\n".join([*lines, "", setting.help, ""])


def render() -> str:
    text = DOC.read_text()
    head = text[: text.index("\n## Server\n") + 1]
    parts = [head]
    for section, title in SECTION_TITLES.items():
        parts.append(f"## {title}\n\n")
        if section == "hooks":
            parts.append(HOOKS_INTRO)
        parts.extend(render_setting(s) + "\n" for s in SETTINGS if s.section == section)
    return "".join(parts).rstrip("\n") + "\n"


def main(argv: list[str]) -> int:
    fresh = render()
    if "--check" in argv:
        if DOC.read_text() != fresh:
            print("docs/configuration.md is out of date: run python scripts/config_docs.py")
            return 1
        return 0
    DOC.write_text(fresh)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
