"""A large real-text corpus every machine with this project installed has: the comment, docstring
and documentation lines of the installed Python packages (site-packages), de-duplicated and
shuffled, as JSONL records {"id": "l<n>", "text": ...} on stdout.

A line is kept when it is 30-300 characters long after stripping `#` and spaces, has at least
five words, and is at least 80% letters and spaces. With the .venv that `make install` builds
(torch, transformers, scipy, pandas, ray, openvino...) that gave 1,351,268 lines, mean length 58
characters (~15 tokens): mostly English prose about code, some code. The exact set depends on the
installed package versions.

    .venv/bin/python bench/package_text.py | head -1001000 > lines.jsonl
    .venv/bin/vecpipe embed lines.jsonl --backend onnx-int8 --batch-size 64 -o lines.arrow
    .venv/bin/python bench/search.py --vectors lines.arrow --vector-sizes 100000,1000000 \
        --sizes '' --no-real
"""
from __future__ import annotations

import os
import random
import re
import sys
import sysconfig

import orjson

WORD = re.compile(r"[A-Za-z]{2,}")
SUFFIXES = (".py", ".md", ".txt", ".rst")


def text_lines(root: str) -> set[str]:
    kept = set()
    for folder, _, files in os.walk(root):
        for name in files:
            if not name.endswith(SUFFIXES):
                continue
            try:
                with open(os.path.join(folder, name), encoding="utf-8", errors="ignore") as f:
                    text = f.read()
            except OSError:
                continue
            for line in text.splitlines():
                line = line.strip().lstrip("#").strip()
                if 30 <= len(line) <= 300 and len(WORD.findall(line)) >= 5 and \
                        sum(c.isalpha() or c == " " for c in line) >= 0.8 * len(line):
                    kept.add(line)
    return kept


def main() -> None:
    root = sys.argv[1] if len(sys.argv) > 1 else sysconfig.get_paths()["purelib"]
    lines = sorted(text_lines(root))
    random.Random(0).shuffle(lines)
    out = sys.stdout.buffer
    try:
        for number, line in enumerate(lines):
            out.write(orjson.dumps({"id": f"l{number}", "text": line}) + b"\n")
    except BrokenPipeError:  # | head
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == "__main__":
    main()
