"""What a file's first bytes show it to be, judged without loading or unpickling anything: text, a zip archive's
first entry, torch's legacy serialization, the globals a pickle would import. Used to name what a checkpoint or
data file is when it is not what it should be."""
from __future__ import annotations

import codecs
import io
import pickletools
from itertools import islice

TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C   # the first pickled value of a legacy torch file


def text_start(head: bytes) -> str | None:
    """The quoted first characters of `head` if it reads as text (UTF-8, no NUL, 95% printable), else None."""
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head)   # tolerates a character cut at the end
    except UnicodeDecodeError:
        return None
    readable = sum(c.isprintable() or c in "\t\n\r\f" for c in text)
    if not text or "\0" in text or readable < 0.95 * len(text):
        return None
    return repr(text[:9] + "..." if len(text) > 9 else text)


def first_zip_entry(head: bytes) -> str | None:
    """The file name in the first local header of a zip archive, when `head` holds all of it."""
    if len(head) < 30:
        return None
    length = int.from_bytes(head[26:28], "little")
    name = head[30:30 + length]
    return name.decode("utf-8", "replace") if len(name) == length else None


def is_legacy_torch(head: bytes) -> bool:
    """Whether `head` starts with the pickled magic number of torch's legacy (pre-zip) serialization."""
    try:
        ops = list(islice(pickletools.genops(io.BytesIO(head)), 4))
    except Exception:   # genops parses untrusted bytes (never executing them)
        return False
    return any(op.name == "LONG1" and arg == TORCH_LEGACY_MAGIC for op, arg, _ in ops)


def pickle_imports(data: bytes) -> list[str]:
    """The `module.name` globals that the pickle `data` would import, found without unpickling it."""
    imports, strings = [], []
    try:
        for op, arg, _ in pickletools.genops(io.BytesIO(data)):
            if op.name in ("GLOBAL", "INST"):
                imports.append(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                imports.append(".".join(strings[-2:]))
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:   # a pickle cut at the scan limit: keep what was found
        pass
    return imports
