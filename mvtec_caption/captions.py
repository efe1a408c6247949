"""The MVTec Caption captions: the shipped normalised JSON copies, the authors' `.py` files (read as
data, never run) and any JSON file a user names, plus the check of the shipped copies against upstream.

Captions are `{category: {defect_type: [caption, ...]}}`; the caption at position `i` belongs to
`test/<defect_type>/<i:03d>.png`.
"""

from __future__ import annotations

import ast
import hashlib
import json
from importlib import resources
from pathlib import Path

from .errors import MVTecCaptionError

Captions = dict[str, dict[str, list[str]]]
# A custom tree's captions: per defect type a list (image order) or {image file name or path: caption}.
CustomCaptions = dict[str, dict[str, "list[str] | dict[str, str]"]]
TEMPLATE = "a {defect} on the {category}"


def template_caption(category: str, defect_type: str) -> str:
    """The caption of an uncaptioned image, from its folder names: "a <defect type words> on the <category>"."""

    def words(name: str) -> str:
        return " ".join(name.replace("_", " ").replace("-", " ").lower().split())

    return TEMPLATE.format(defect=words(defect_type), category=words(category))


DATA_DIR = resources.files("mvtec_caption") / "data"  # package data: the same in a wheel as in a checkout
# Provenance of the shipped captions: upstream repository, commit, and sha256 of each authors' file.
SOURCES = json.loads((DATA_DIR / "sources.json").read_text(encoding="utf-8"))
CAPTIONS_REPO: str = SOURCES["repository"]
CAPTIONS_COMMIT: str = SOURCES["commit"]
CAPTION_SOURCES = {
    name: (entry["source"], entry["source_sha256"]) for name, entry in SOURCES["configs"].items()
}


def shipped_captions_path(config_name: str) -> Path:
    """The normalised JSON copy of the authors' captions that ships with the package."""
    return DATA_DIR / SOURCES["configs"][config_name]["captions"]


def shipped_captions(config_name: str) -> Captions:
    """The authors' captions of `ad` or `loco`, read from the package (no network)."""
    path = shipped_captions_path(config_name)
    expected = SOURCES["configs"][config_name]["captions_sha256"]
    if sha256_of(path) != expected:
        raise MVTecCaptionError(
            f"The shipped captions file {path} has been changed (sha256 differs from {expected} in "
            f"{DATA_DIR / 'sources.json'}); reinstall the package or pass your own file with --captions"
        )
    return read_captions(path)


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


def first_difference(expected: Captions, actual: Captions) -> str | None:
    """Where two caption sets first differ (category, defect type, position), or None when equal."""
    for category in dict.fromkeys([*expected, *actual]):
        if category not in actual or category not in expected:
            return f"category {category!r} is only in the {'shipped' if category in expected else 'fetched'} copy"
        for defect in dict.fromkeys([*expected[category], *actual[category]]):
            want, got = expected[category].get(defect), actual[category].get(defect)
            if want is None or got is None:
                side = "shipped" if got is None else "fetched"
                return f"{category}/{defect} is only in the {side} copy"
            if len(want) != len(got):
                return f"{category}/{defect}: {len(want)} shipped captions, {len(got)} fetched"
            for i, (a, b) in enumerate(zip(want, got, strict=True)):
                if a != b:
                    return f"{category}/{defect} caption {i}: shipped {a!r}, fetched {b!r}"
    return None


def fetch_caption_source(config_name: str, cache_dir: str | Path | None = None) -> Path:
    """Downloads the authors' file of `config_name` at the pinned commit (only `verify` needs the network)."""
    import datasets

    url = caption_source_url(config_name)
    config = datasets.DownloadConfig(cache_dir=None if cache_dir is None else str(cache_dir))
    try:
        return Path(datasets.DownloadManager(download_config=config).download(url))
    except Exception as err:
        raise MVTecCaptionError(
            f"Could not fetch {url} ({type(err).__name__}: {err}); download it yourself and pass it with --source FILE"
        ) from err


def verify_shipped_captions(config_name: str, source: str | Path) -> int:
    """Checks an authors' file (sha256 pinned) against the shipped copy; returns the caption count."""
    verify_caption_source(source, config_name)
    fetched = read_captions(source)
    shipped = shipped_captions(config_name)
    difference = first_difference(shipped, fetched)
    if difference is not None:
        raise MVTecCaptionError(
            f"The captions of {source} differ from the shipped {shipped_captions_path(config_name).name}: {difference}"
        )
    return sum(len(v) for defects in shipped.values() for v in defects.values())


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


def read_custom_captions(path: str | Path | None) -> CustomCaptions:
    """A custom tree's captions JSON: {category: {defect_type: [caption, ...] | {image: caption}}}; None: {}."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise MVTecCaptionError(f"Captions file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MVTecCaptionError(f"Captions file {path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise MVTecCaptionError(
            f"Captions file {path} must hold {{category: {{defect_type: [caption, ...]}}}}"
        )
    for category, defects in data.items():
        if not isinstance(defects, dict):
            raise MVTecCaptionError(
                f"Captions file {path}: category {category!r} must map defect types to captions"
            )
        for defect, items in defects.items():
            ok = (isinstance(items, list) and all(isinstance(c, str) for c in items)) or (
                isinstance(items, dict) and all(isinstance(c, str) for c in items.values())
            )
            if not ok:
                raise MVTecCaptionError(
                    f"Captions file {path}: {category}/{defect} must be a list of captions or {{image: caption}}"
                )
    return data
