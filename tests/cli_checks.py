"""One home for "a bad command-line input is refused cleanly": exit code 2, one line naming the
thing, no traceback, and nothing under the watched folders created, changed or deleted."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path


def snapshot(folders: Iterable[str | os.PathLike]) -> dict[str, str]:
    """Every file and folder under ``folders`` with a hash of its bytes (folders map to "dir")."""
    state: dict[str, str] = {}
    for folder in map(Path, folders):
        if not folder.exists():
            state[str(folder)] = "absent"
            continue
        if folder.is_file():
            state[str(folder)] = hashlib.sha256(folder.read_bytes()).hexdigest()
            continue
        for path in sorted(folder.rglob("*")):
            state[str(path)] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def assert_refused(
    main: Callable[[Sequence[str]], int | None],
    argv: Sequence[str],
    mentions: str | Sequence[str],
    watch: Iterable[str | os.PathLike] = (),
) -> str:
    """Runs ``main(argv)`` in this process and asserts a clean refusal; returns the error line.

    ``mentions``: text(s) the one line must contain (the file, argument or category at fault).
    ``watch``: folders (or files) that must be left exactly as they were.
    """
    watch = list(watch)
    before = snapshot(watch)
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(list(argv))
        except SystemExit as stop:
            code = stop.code
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    assert code == 2, f"exit code {code!r}, stderr: {err.getvalue()!r}"
    assert len(lines) == 1, f"expected one error line, got: {err.getvalue()!r}"
    assert "Traceback" not in err.getvalue() + out.getvalue()
    for text in [mentions] if isinstance(mentions, str) else mentions:
        assert str(text) in lines[0], f"{text!r} not named in {lines[0]!r}"
    assert snapshot(watch) == before, "the refused command created, changed or deleted files"
    return lines[0]
