"""What every card this project writes shares: templates shipped as package data, the Hub's size labels, the
licences, and a check of the YAML with huggingface_hub's card data classes before anything is written.

The dataset card lives here; the model card and the synthetic dataset card (``axf_pipeline/cards/``) use the
same helpers, so an installed wheel renders exactly what a checkout renders.
"""

from __future__ import annotations

import os
import re
from importlib import resources

from huggingface_hub import CardData

# The licences this project writes by itself: its own (toy data and toy models) and MVTec's (MVTec AD / LOCO
# images, and models trained on them). "unknown" is the Hub's id for data whose licence nobody stated.
PROJECT_LICENSE = "apache-2.0"
MVTEC_LICENSE = "cc-by-nc-sa-4.0"
UNKNOWN_LICENSE = "unknown"
_LICENSE_ID = re.compile(r"^[a-z0-9][a-z0-9.+-]*$")
# The Hub's size_categories labels, smallest first, with the upper bound of each (n < bound).
SIZE_CATEGORIES = (
    ("n<1K", 10**3),
    ("1K<n<10K", 10**4),
    ("10K<n<100K", 10**5),
    ("100K<n<1M", 10**6),
    ("1M<n<10M", 10**7),
    ("10M<n<100M", 10**8),
    ("100M<n<1B", 10**9),
    ("1B<n<10B", 10**10),
    ("10B<n<100B", 10**11),
    ("100B<n<1T", 10**12),
)


def card_template(package: str, name: str) -> str:
    """The text of the card template ``<package>/cards/<name>``, read as package data (checkout or wheel)."""
    template = resources.files(package).joinpath("cards", name)
    if not template.is_file():
        raise FileNotFoundError(
            f"The card template {package}/cards/{name} is missing from this installation of anomalyxfusion; "
            "reinstall the package"
        )
    return template.read_text(encoding="utf-8")


def size_category(n: int) -> str:
    """The Hub's ``size_categories`` label of a dataset of ``n`` examples (``n<1K`` ... ``n>1T``)."""
    return next((label for label, bound in SIZE_CATEGORIES if n < bound), "n>1T")


def check_license_id(license: str, flag: str = "--license") -> str:
    """A licence as the Hub spells it (``apache-2.0``, ``cc-by-4.0``, ``unknown``); ``other`` needs a name and
    a link the card cannot invent, so it is refused here with the way out."""
    if not _LICENSE_ID.match(license or "") or license == "other":
        raise ValueError(
            f"{flag} {license!r} is not a Hub licence id: give one such as apache-2.0, mit, cc-by-4.0, "
            f"{MVTEC_LICENSE} or {UNKNOWN_LICENSE} (https://huggingface.co/docs/hub/repositories-licenses)"
        )
    return license


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)


def check_card_data(card_data: CardData, local_paths=()) -> CardData:
    """Refuse YAML the Hub would misread or that leaks a local path, naming the field; returns ``card_data``.

    ``card_data`` is a ``ModelCardData`` or ``DatasetCardData``: its ``to_dict`` is what the card's YAML holds.
    ``local_paths``: the references a user typed (model, dataset, output); none that is local may appear.
    """
    data = card_data.to_dict()
    licenses = data.get("license")
    for license in licenses if isinstance(licenses, list) else [licenses]:
        if license != "other":
            check_license_id(license, "license")
    if "other" in (licenses if isinstance(licenses, list) else [licenses]):
        for field in ("license_name", "license_link"):
            if not data.get(field):
                raise ValueError(f"card YAML: license: other needs {field}")
    sizes = data.get("size_categories")
    labels = {label for label, _ in SIZE_CATEGORIES} | {"n>1T"}
    for size in [sizes] if isinstance(sizes, str) else sizes or []:
        if size not in labels:
            raise ValueError(f"card YAML: size_categories {size!r} is not one of the Hub's labels")
    for field in ("tags", "datasets", "task_categories"):
        value = data.get(field)
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise ValueError(f"card YAML: {field} must be a list of strings, got {value!r}")
    check_publishable(data, local_paths, "card YAML")
    return card_data


def check_publishable(value, local_paths=(), where: str = "card") -> None:
    """Refuse any absolute path, and any local path the user typed (a reference that is no local file or
    folder is a Hub id, published as is), in what is about to be published."""
    typed = [os.fspath(p) for p in local_paths if p is not None and os.path.exists(p) and os.fspath(p) != "."]
    typed += [os.path.abspath(p) for p in typed]
    for text in _strings(value):
        for path in typed:
            if os.sep in path and path in text:
                raise ValueError(f"{where} holds the local path {path!r}")
        if re.search(r"(^|[\s`'\"(=])(/[^\s/`'\"]+){2,}", text) or re.match(r"^[A-Za-z]:[\\/]", text):
            raise ValueError(f"{where} holds an absolute path: {text[:120]!r}")
