"""Reading the MVTec Caption captions: the authors' `.py` files (as data) or a normalised JSON file.

Captions are `{category: {defect_type: [caption, ...]}}`; the caption at position `i` belongs to
`test/<defect_type>/<i:03d>.png`.
"""

from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path

from .errors import MVTecCaptionError

Captions = dict[str, dict[str, list[str]]]

CAPTIONS_REPO = "hujiecpp/MVTec-Caption"
CAPTIONS_COMMIT = "2350d89c028fc34e92bb5779f7244c3dbe202b5e"

# The authors' files at the pinned commit and their sha256 (see the project's data notes).
CAPTION_SOURCES = {
    "ad": (
        "tools/Construct_MVTEC-AD-Caption.py",
        "e3993006908461d7d42c06a8c206772b0a13421e34f328ae29bd9508e58ef2de",
    ),
    "loco": (
        "tools/Construct_MVTEC-LOCO-Caption.py",
        "f05813823cc5b215b1c5de3e994cf4ec49cf7d2a5f9f67853b5c16f86a6cf376",
    ),
}


def caption_source_url(config_name: str) -> str:
    path, _ = CAPTION_SOURCES[config_name]
    return f"https://raw.githubusercontent.com/{CAPTIONS_REPO}/{CAPTIONS_COMMIT}/{path}"


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_caption_source(path: str | Path, config_name: str) -> None:
    """A fetched authors' file must be byte-identical to the pinned one, or its captions may be shifted."""
    expected = CAPTION_SOURCES[config_name][1]
    actual = sha256_of(path)
    if actual != expected:
        raise MVTecCaptionError(
            f"Captions file {path} has sha256 {actual}, expected {expected} "
            f"({CAPTION_SOURCES[config_name][0]} at {CAPTIONS_REPO}@{CAPTIONS_COMMIT}). "
            "Pass a captions file you trust with --captions / captions=."
        )


def _literal_captions(node: ast.AST, where: str) -> dict[str, list[str]] | None:
    """`{"defect": ["caption", ...], ...}` as a dict, or None when the literal has another shape."""
    try:
        value = ast.literal_eval(node)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None
    if not isinstance(value, dict) or not value:
        return None
    for defect, captions in value.items():
        if not isinstance(defect, str) or not isinstance(captions, list):
            return None
        if not all(isinstance(c, str) for c in captions):
            raise MVTecCaptionError(f"{where}: defect type {defect!r} holds a caption that is not a string")
    return value


def parse_caption_script(source: str, filename: str = "<captions>") -> Captions:
    """Read the dict literals of an authors' script without running it.

    The file holds `bottle = {"broken_large": [...], ...}` per category and
    `categories = {"bottle": bottle, ...}`; every other statement is ignored.
    """
    try:
        tree = ast.parse(source, filename=filename)
    except SyntaxError as err:
        raise MVTecCaptionError(f"Captions file {filename} is not valid Python: {err}") from err
    literals: dict[str, dict[str, list[str]]] = {}
    index_node: ast.Dict | None = None
    for stmt in tree.body:
        if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1):
            continue
        target = stmt.targets[0]
        if not isinstance(target, ast.Name) or not isinstance(stmt.value, ast.Dict):
            continue
        if target.id == "categories":
            index_node = stmt.value
            continue
        value = _literal_captions(stmt.value, f"{filename}: {target.id}")
        if value is not None:
            literals[target.id] = value
    if index_node is None:
        raise MVTecCaptionError(
            f"Captions file {filename} has no `categories = {{...}}` dict naming the categories"
        )
    captions: Captions = {}
    for key, value in zip(index_node.keys, index_node.values, strict=True):
        if not (isinstance(key, ast.Constant) and isinstance(key.value, str)):
            raise MVTecCaptionError(f"Captions file {filename}: `categories` has a key that is not a string")
        if isinstance(value, ast.Name):
            if value.id not in literals:
                raise MVTecCaptionError(
                    f"Captions file {filename}: category {key.value!r} refers to {value.id!r}, "
                    "which is not a dict literal of captions in that file"
                )
            captions[key.value] = literals[value.id]
        else:
            literal = _literal_captions(value, f"{filename}: {key.value}")
            if literal is None:
                raise MVTecCaptionError(
                    f"Captions file {filename}: category {key.value!r} is not a dict literal"
                )
            captions[key.value] = literal
    return captions


def _validate(captions: object, filename: str) -> Captions:
    if not isinstance(captions, dict) or not captions:
        raise MVTecCaptionError(
            f"Captions file {filename} must hold {{category: {{defect_type: [caption, ...]}}}}"
        )
    for category, defects in captions.items():
        if not isinstance(defects, dict) or not defects:
            raise MVTecCaptionError(
                f"Captions file {filename}: category {category!r} must map defect types to lists"
            )
        for defect, items in defects.items():
            if not isinstance(items, list) or not all(isinstance(c, str) for c in items):
                raise MVTecCaptionError(
                    f"Captions file {filename}: {category}/{defect} must be a list of caption strings"
                )
    return captions  # type: ignore[return-value]


def read_captions(path: str | Path) -> Captions:
    """Captions from an authors' `.py` file (read as data, never executed) or a JSON file."""
    path = Path(path)
    if not path.is_file():
        raise MVTecCaptionError(f"Captions file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".py":
        return _validate(parse_caption_script(text, str(path)), str(path))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise MVTecCaptionError(
            f"Captions file {path} is neither an authors' .py file nor valid JSON: {err}"
        ) from err
    return _validate(data, str(path))


def write_captions_json(captions: Captions, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(captions, indent=1, ensure_ascii=False), encoding="utf-8")
    return path
