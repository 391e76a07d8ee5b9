"""The README's "Try it" section, read as the list of requests it shows.

So the tests follow the README.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class CurlCall:
    """One ``curl`` command of the README: method, path, headers and body."""

    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    body: str | None = None
    """The JSON body as written (``-d '...'``), or a file's content for ``-d @file``."""
    source: str = ""


def section(markdown: str, title: str) -> str:
    """The text of the ``## title`` section, up to the next ``## `` heading."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", markdown, re.DOTALL | re.MULTILINE)
    if match is None:
        raise ValueError(f"README has no section {title!r}")
    return match.group(1)


def curl_calls(readme: Path = ROOT / "README.md", title: str = "Try it") -> list[CurlCall]:
    """Every ``curl`` command in the section's ``sh`` code blocks, in order."""
    text = section(readme.read_text(), title)
    calls = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.DOTALL):
        pending = ""
        for line in block.splitlines():
            if not pending and not line.startswith("curl"):
                continue  # a comment showing output, or a blank line
            pending += line + "\n"
            if line.endswith("\\"):
                continue  # continued on the next line
            try:
                words = shlex.split(pending.replace("\\\n", " "), comments=True)
            except ValueError:
                continue  # a quoted body still open: it goes on on the next line
            calls.append(_parse(words))
            pending = ""
    return calls


def _parse(words: list[str]) -> CurlCall:
    if words[0] != "curl":
        raise ValueError(f"not a curl command: {' '.join(words)}")
    headers: dict[str, str] = {}
    body: str | None = None
    url = ""
    position = 1
    while position < len(words):
        word = words[position]
        if word == "-s":
            position += 1
        elif word == "-H":
            name, _, value = words[position + 1].partition(":")
            headers[name.strip().lower()] = value.strip()
            position += 2
        elif word == "-d":
            data = words[position + 1]
            body = (ROOT / data[1:]).read_text() if data.startswith("@") else data
            position += 2
        else:
            url = word
            position += 1
    path = "/" + url.split("/", 1)[1] if "/" in url else "/"
    return CurlCall("POST" if body is not None else "GET", path, headers, body, " ".join(words))
