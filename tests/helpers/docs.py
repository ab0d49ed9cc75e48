"""The commands the docs show: every command line of the ```bash blocks of README.md and docs/*.md. Tests that run a
documented command take it from its page with `documented_command`, so that the page cannot drift from what is
tested; tests/test_docs.py finds, for every command, the test that runs it (or why none can here).

    documented_command("docs/distributed.md", "torchrun --nnodes", {"R": ["0"], "run_dir=DIR": [...], ...})
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"^```bash\n(.*?)^```", re.M | re.S)
COMMENT = re.compile(r"(^|\s)#.*$")


def pages() -> list[str]:
    """The pages whose commands are documented, relative to the checkout: README.md, then docs/*.md."""
    return ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]


def commands(page: str) -> list[str]:
    """The command lines of `page`'s ```bash blocks in order: `\\`-continued lines joined, comments and blank lines
    dropped, every run of spaces one space."""
    found = []
    for block in BLOCK.findall((ROOT / page).read_text()):
        for line in block.replace("\\\n", " ").splitlines():
            command = " ".join(COMMENT.sub("", line).split())
            if command:
                found.append(command)
    return found


def matches(command: str, start: str) -> bool:
    """The rule by which a command with placeholders (R, G, DIR, `...`) is named: `start` is the whole command or
    the words it begins with."""
    return command == start or command.startswith(start + " ")


def documented_command(page: str, start: str, fill: dict[str, list[str]]) -> list[str]:
    """The one command of `page` that `matches` `start`, as words, each word that is a key of `fill` replaced by its
    words: the test runs what the page says."""
    found = [command for command in commands(page) if matches(command, start)]
    assert len(found) == 1, f"{page} should show one command that starts with {start!r}, not {found}"
    return [out for word in shlex.split(found[0]) for out in fill.get(word, [word])]
