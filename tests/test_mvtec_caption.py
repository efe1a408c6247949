"""MVTecCaption builder on MVTec-shaped trees with the real captions: alignment, counts, masks, bad input."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
from cli_checks import assert_refused
from PIL import Image

from mvtec_caption import MVTecCaption, MVTecCaptionError, make_sample_tree, read_captions
from mvtec_caption.captions import shipped_captions, shipped_captions_path
from mvtec_caption.cli import main
from mvtec_caption.layout import CATEGORIES, GRAYSCALE_CATEGORIES
from mvtec_caption.sample_tree import pack_tar_xz, stamp_of

SCALE = 0.02  # LOCO stays non-square (e.g. 16x32, 34x17); AD about 20x20


def _real_captions(config_name: str) -> dict:
    """The authors' captions as shipped with the package (no file outside the repository)."""
    return shipped_captions(config_name)


def _build(config_name: str, data_dir, captions, cache_dir, **kwargs) -> datasets.DatasetDict:
    builder = MVTecCaption(
        config_name=config_name,
        data_dir=str(data_dir),
        captions=str(captions),
        cache_dir=str(cache_dir),
        **kwargs,
    )
    builder.download_and_prepare()
    return builder.as_dataset()


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """Both layouts laid out at the real caption counts, built once for the module."""
    out = {}
    for config_name in ("ad", "loco"):
        base = tmp_path_factory.mktemp(f"real_{config_name}")
        captions = _real_captions(config_name)
        tree = make_sample_tree(
            base / "tree", config_name, captions, scale=SCALE, n_train=1, captions_path=base / "c.json"
        )
        out[config_name] = (tree, _build(config_name, tree.root, tree.captions_path, base / "cache"))
    return out


@pytest.mark.parametrize("config_name,expected", [("ad", 1258), ("loco", 993)])
def test_counts_match_the_published_captions(real, config_name, expected):
    tree, ds = real[config_name]
    test = ds["test"]
    assert sum(test["is_anomaly"]) == expected
    assert sum(bool(c) for c in test["caption"]) == expected
    per_defect = Counter(
        (c, d) for c, d, a in zip(test["category"], test["defect_type"], test["is_anomaly"], strict=True) if a
    )
    assert per_defect == {(c, d): len(v) for c, defects in tree.captions.items() for d, v in defects.items()}
    assert set(test["category"]) == set(CATEGORIES[config_name])
    expected_splits = {"train", "test"} | ({"validation"} if config_name == "loco" else set())
    assert set(ds) == expected_splits
    for split in expected_splits - {"test"}:
        assert not any(ds[split]["is_anomaly"]) and set(ds[split]["caption"]) == {""}


@pytest.mark.parametrize("config_name", ["ad", "loco"])
def test_every_caption_lands_on_its_image(real, config_name):
    """The image pixels carry (index, category, defect): the caption must be the one at that index."""
    tree, ds = real[config_name]
    for row in ds["test"]:
        index, category_id, defect_id = stamp_of(row["image"])
        category = CATEGORIES[config_name][category_id]
        assert category == row["category"]
        if not row["is_anomaly"]:
            assert row["caption"] == "" and row["fold"] == "" and not np.asarray(row["mask"]).any()
            continue
        defect = list(tree.captions[category])[defect_id]
        assert defect == row["defect_type"]
        assert row["caption"] == tree.captions[category][defect][index]
        assert row["path"] == f"{category}/test/{defect}/{index:03d}.png"
        n = len(tree.captions[category][defect])
        assert row["fold"] == ("generator" if index < n // 3 else "evaluation")


def test_grayscale_categories_decode_as_rgb(real):
    tree, ds = real["ad"]
    rows = ds["test"].filter(lambda c: c in GRAYSCALE_CATEGORIES, input_columns="category")
    assert len(rows) > 0
    with Image.open(tree.root / rows[0]["path"]) as raw:
        assert raw.mode == "L"
    for row in rows.select(range(0, len(rows), 25)):
        assert row["image"].mode == "RGB"
        assert row["mask"].mode == "L"


def test_loco_masks_are_exact_unions_of_region_files(real):
    tree, ds = real["loco"]
    test = ds["test"].filter(lambda a: a, input_columns="is_anomaly")
    below_threshold_pixels = 0
    multi_region = 0
    for row in test:
        regions = sorted(
            (tree.root / row["category"] / "ground_truth" / row["defect_type"] / Path(row["path"]).stem).glob(
                "*.png"
            )
        )
        stack = np.stack([np.asarray(Image.open(p)) for p in regions])
        assert stack.max() < 255  # the trap: region values below 255
        mask = np.asarray(row["mask"])
        assert row["image"].size == row["mask"].size
        assert row["image"].size[0] != row["image"].size[1]
        assert set(np.unique(mask)) <= {0, 255}
        np.testing.assert_array_equal(mask, np.where(stack.max(axis=0) > 0, 255, 0))
        below_threshold_pixels += int(((stack.max(axis=0) > 0) & (stack.max(axis=0) < 245)).sum())
        multi_region += len(regions) > 1
    assert below_threshold_pixels > 0 and multi_region > 0


def test_ad_masks_match_their_files(real):
    tree, ds = real["ad"]
    for row in ds["test"].select(range(0, len(ds["test"]), 40)):
        if row["is_anomaly"]:
            path = (
                tree.root
                / row["category"]
                / "ground_truth"
                / row["defect_type"]
                / f"{Path(row['path']).stem}_mask.png"
            )
            np.testing.assert_array_equal(np.asarray(row["mask"]), np.asarray(Image.open(path)))


# --- small trees for input variants and bad input ---------------------------------------------------


@pytest.fixture
def small(tmp_path):
    """A fresh synthetic tree per test (AD with a grayscale category, LOCO non-square)."""

    def make(config_name="ad"):
        tree = make_sample_tree(
            tmp_path / config_name, config_name, scale=0.02, captions_path=tmp_path / f"{config_name}.json"
        )
        return tree

    return make


def _captions_script(captions: dict, marker: Path) -> str:
    """An authors'-format script whose top-level code would leave `marker` behind if it were run."""
    lines = ["import os", "import shutil", ""]
    for category, defects in captions.items():
        lines.append(f"{category}={json.dumps(defects, indent=4)}\n")
    lines.append("categories = {\n" + ",\n".join(f'    "{c}": {c}' for c in captions) + "\n}\n")
    lines.append(f"open({str(marker)!r}, 'w').write('executed')")
    lines.append("os.makedirs('./datasets/mvtec_anomaly_detection', exist_ok=True)")
    return "\n".join(lines) + "\n"


def test_authors_py_file_is_read_as_data_not_run(tmp_path, monkeypatch, small):
    monkeypatch.chdir(tmp_path)
    captions = _real_captions("loco")
    marker = tmp_path / "EXECUTED"
    script = tmp_path / "Construct_MVTEC-LOCO-Caption.py"
    script.write_text(_captions_script(captions, marker))
    assert read_captions(script) == captions
    assert not marker.exists() and not (tmp_path / "datasets").exists()
    # and a build from a .py file works end to end
    tree = small("ad")
    py = tmp_path / "ad.py"
    py.write_text(_captions_script(tree.captions, marker))
    ds = _build("ad", tree.root, py, tmp_path / "cache")
    assert sum(ds["test"]["is_anomaly"]) == sum(len(v) for d in tree.captions.values() for v in d.values())
    assert not marker.exists()


def test_tar_xz_archive_builds_the_same_rows(tmp_path, small):
    tree = small("loco")
    archive = pack_tar_xz(tree.root, tmp_path / "mvtec_loco_anomaly_detection.tar.xz")
    from_folder = _build("loco", tree.root, tree.captions_path, tmp_path / "c1")
    from_archive = _build("loco", archive, tree.captions_path, tmp_path / "c2")
    for split in from_folder:
        cols = ["path", "caption", "fold"]
        assert (
            from_archive[split].select_columns(cols).to_list()
            == from_folder[split].select_columns(cols).to_list()
        )
    row = from_archive["test"][-1]
    assert row["image"].tobytes() == Image.open(tree.root / row["path"]).convert("RGB").tobytes()


def test_category_subset_needs_only_its_folders(tmp_path, small):
    tree = small("ad")
    for other in ("bottle", "screw"):
        shutil.rmtree(tree.root / other)
    ds = _build("ad", tree.root, tree.captions_path, tmp_path / "cache", categories=["grid"])
    assert set(ds["test"]["category"]) == {"grid"} == set(ds["train"]["category"])
    with pytest.raises(MVTecCaptionError, match="Category folder .*bottle.*missing"):
        _build("ad", tree.root, tree.captions_path, tmp_path / "cache2")
    with pytest.raises(MVTecCaptionError, match="Unknown ad categories \\['gird'\\]"):
        _build("ad", tree.root, tree.captions_path, tmp_path / "cache3", categories=["gird"])


def _rewrite_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_caption_count_mismatch_names_category_defect_and_counts(tmp_path, small):
    tree = small("ad")
    _rewrite_json(tree.captions_path, lambda d: d["grid"]["bent"].pop())
    with pytest.raises(MVTecCaptionError, match=r"grid/bent: 2 captions but 3 images in .*test/bent"):
        _build("ad", tree.root, tree.captions_path, tmp_path / "cache")


def test_missing_image_is_named(tmp_path, small):
    tree = small("ad")
    folder = tree.root / "bottle" / "test" / "contamination"
    (folder / "001.png").rename(folder / "009.png")  # same count, one number missing
    with pytest.raises(
        MVTecCaptionError,
        match=r"bottle/contamination: image .*001\.png is missing \(captions: 5, images: 5\)",
    ):
        _build("ad", tree.root, tree.captions_path, tmp_path / "cache")


def test_missing_ad_mask_is_named(tmp_path, small):
    tree = small("ad")
    (tree.root / "screw" / "ground_truth" / "scratch_head" / "002_mask.png").unlink()
    with pytest.raises(
        MVTecCaptionError,
        match=r"screw/scratch_head image .*002\.png \(3 of 5 captions, 5 images\): mask .*002_mask\.png is missing",
    ):
        _build("ad", tree.root, tree.captions_path, tmp_path / "cache")


def test_missing_loco_mask_folder_is_named(tmp_path, small):
    tree = small("loco")
    shutil.rmtree(tree.root / "juice_bottle" / "ground_truth" / "logical_anomalies" / "000")
    with pytest.raises(
        MVTecCaptionError,
        match=r"juice_bottle/logical_anomalies image .*000\.png .*mask folder .*000 is missing",
    ):
        _build("loco", tree.root, tree.captions_path, tmp_path / "cache")


def test_missing_defect_folder_is_named(tmp_path, small):
    tree = small("loco")
    shutil.rmtree(tree.root / "breakfast_box" / "test" / "structural_anomalies")
    with pytest.raises(
        MVTecCaptionError,
        match=r"breakfast_box/structural_anomalies: image folder .* is missing \(captions: 5, images: 0\)",
    ):
        _build("loco", tree.root, tree.captions_path, tmp_path / "cache")


def test_uncaptioned_defect_folder_is_refused(tmp_path, small):
    tree = small("ad")
    shutil.copytree(tree.root / "grid" / "test" / "bent", tree.root / "grid" / "test" / "thread")
    with pytest.raises(MVTecCaptionError, match=r"grid/thread: 3 images in .* but 0 captions"):
        _build("ad", tree.root, tree.captions_path, tmp_path / "cache")


def test_mask_size_mismatch_names_both_sizes(tmp_path, small):
    tree = small("loco")
    region = tree.root / "breakfast_box" / "ground_truth" / "logical_anomalies" / "001" / "001.png"
    Image.open(region).resize((10, 10)).save(region)
    with pytest.raises(
        MVTecCaptionError,
        match=r"breakfast_box/logical_anomalies: mask .*001/001\.png is 10x10 but image .*001\.png is 32x26",
    ):
        _build("loco", tree.root, tree.captions_path, tmp_path / "cache")


def test_captions_of_the_other_config_are_refused(tmp_path, small):
    tree = small("loco")
    with pytest.raises(MVTecCaptionError, match="not MVTec LOCO categories"):
        _build("loco", tree.root, shipped_captions_path("ad"), tmp_path / "cache")


def test_shipped_captions_and_their_provenance():
    """The package carries the 2,251 captions and where they came from (repository, commit, sha256)."""
    from mvtec_caption.captions import CAPTION_SOURCES, CAPTIONS_COMMIT, CAPTIONS_REPO

    counts = {
        c: sum(len(v) for d in shipped_captions(c).values() for v in d.values()) for c in ("ad", "loco")
    }
    assert counts == {"ad": 1258, "loco": 993}
    assert list(shipped_captions("ad")) == list(CATEGORIES["ad"])
    assert set(shipped_captions("loco")) == set(CATEGORIES["loco"])
    assert shipped_captions("ad")["bottle"]["broken_large"][0] == "The bottle has a large broken."
    assert CAPTIONS_REPO == "hujiecpp/MVTec-Caption"
    assert CAPTIONS_COMMIT == "2350d89c028fc34e92bb5779f7244c3dbe202b5e"
    assert CAPTION_SOURCES["loco"] == (
        "tools/Construct_MVTEC-LOCO-Caption.py",
        "f05813823cc5b215b1c5de3e994cf4ec49cf7d2a5f9f67853b5c16f86a6cf376",
    )
    notes = (shipped_captions_path("ad").parent / "README.md").read_text()
    assert CAPTIONS_COMMIT in notes and CAPTION_SOURCES["ad"][1] in notes


def test_builds_offline_from_the_shipped_captions(tmp_path, monkeypatch):
    """No captions argument and no network: the shipped captions are used."""
    captions = _real_captions("loco")
    subset = {"juice_bottle": captions["juice_bottle"]}
    tree = make_sample_tree(tmp_path / "tree", "loco", subset, scale=0.01, n_train=1)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)

    def no_network(self, url):
        raise AssertionError(f"the build tried to download {url}")

    monkeypatch.setattr(datasets.DownloadManager, "download", no_network)
    builder = MVTecCaption(
        config_name="loco",
        data_dir=str(tree.root),
        categories=["juice_bottle"],
        cache_dir=str(tmp_path / "c"),
    )
    builder.download_and_prepare()
    test = builder.as_dataset()["test"]
    anomalies = test.filter(lambda a: a, input_columns="is_anomaly")
    expected = [c for defect in subset["juice_bottle"].values() for c in defect]
    assert anomalies["caption"] == expected


def test_a_changed_shipped_copy_is_refused(tmp_path, monkeypatch):
    import mvtec_caption.captions as captions_module

    changed = tmp_path / "data"
    shutil.copytree(captions_module.DATA_DIR, changed)
    _rewrite_json(changed / "ad_captions.json", lambda d: d["bottle"]["broken_large"].pop())
    monkeypatch.setattr(captions_module, "DATA_DIR", changed)
    with pytest.raises(
        MVTecCaptionError, match=r"shipped captions file .*ad_captions\.json has been changed"
    ):
        shipped_captions("ad")


def _stub_download(monkeypatch, served: Path) -> list[str]:
    urls = []

    def fake_download(self, url):
        urls.append(url)
        return str(served)

    monkeypatch.setattr(datasets.DownloadManager, "download", fake_download)
    return urls


def test_verify_fetches_the_pinned_file_and_refuses_a_tampered_one(tmp_path, monkeypatch, capsys):
    tampered = tmp_path / "Construct_MVTEC-LOCO-Caption.py"
    tampered.write_text(_captions_script(_real_captions("loco"), tmp_path / "EXECUTED"))
    urls = _stub_download(monkeypatch, tampered)
    assert_refused(
        main, ["verify", "--config", "loco"], ["sha256", "expected f05813823cc5b215", str(tampered)]
    )
    assert urls == [
        "https://raw.githubusercontent.com/hujiecpp/MVTec-Caption/2350d89c028fc34e92bb5779f7244c3dbe202b5e/"
        "tools/Construct_MVTEC-LOCO-Caption.py"
    ]
    assert not (tmp_path / "EXECUTED").exists()


def test_verify_compares_the_fetched_captions_with_the_shipped_copy(tmp_path, monkeypatch, capsys):
    """With the pinned sha256 pointed at our stand-in file, the comparison itself decides."""
    import mvtec_caption.captions as captions_module

    captions = _real_captions("loco")
    source = tmp_path / "Construct_MVTEC-LOCO-Caption.py"
    source.write_text(_captions_script(captions, tmp_path / "EXECUTED"))
    _stub_download(monkeypatch, source)
    monkeypatch.setitem(
        captions_module.CAPTION_SOURCES,
        "loco",
        (captions_module.CAPTION_SOURCES["loco"][0], captions_module.sha256_of(source)),
    )
    assert main(["verify", "--config", "loco"]) == 0
    assert "loco: 993 captions" in capsys.readouterr().out
    captions["pushpins"]["logical_anomalies"][7] = "A changed caption."
    source.write_text(_captions_script(captions, tmp_path / "EXECUTED"))
    monkeypatch.setitem(
        captions_module.CAPTION_SOURCES,
        "loco",
        (captions_module.CAPTION_SOURCES["loco"][0], captions_module.sha256_of(source)),
    )
    assert_refused(main, ["verify", "--config", "loco", "--source", str(source)],
                   [str(source), "pushpins/logical_anomalies caption 7", "A changed caption."])  # fmt: skip


def test_verify_offline_says_how_to_pass_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)

    def offline(self, url):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets.DownloadManager, "download", offline)
    assert_refused(main, ["verify", "--config", "ad"], ["Construct_MVTEC-AD-Caption.py", "--source FILE"])


def test_bad_captions_files_are_named(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"grid": {"bent": "not a list"}}')
    with pytest.raises(MVTecCaptionError, match=r"bad\.json: grid/bent must be a list"):
        read_captions(bad)
    with pytest.raises(MVTecCaptionError, match=r"missing\.json does not exist"):
        read_captions(tmp_path / "missing.json")
    script = tmp_path / "noindex.py"
    script.write_text('grid = {"bent": ["a"]}\n')
    with pytest.raises(MVTecCaptionError, match=r"noindex\.py has no `categories"):
        read_captions(script)


# --- damaged files and interrupted extractions --------------------------------------------------------


def _cli_build(tree, output, cache, config_name="ad", data_dir=None):
    return ["build", "--config", config_name, "--data-dir", str(data_dir or tree.root), "--captions",
            str(tree.captions_path), "--output", str(output), "--cache-dir", str(cache)]  # fmt: skip


def test_half_truncated_image_or_mask_is_named(tmp_path, small):
    """Its header is whole, so only a check of every byte finds it: the build must, and name it."""
    tree = small("ad")
    image = tree.root / "bottle" / "test" / "contamination" / "003.png"
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    with pytest.raises(MVTecCaptionError, match=rf"{image} is not a readable image \(truncated"):
        _build("ad", tree.root, tree.captions_path, tmp_path / "cache")
    tree = make_sample_tree(tmp_path / "t2", "ad", scale=0.02, captions_path=tmp_path / "t2.json")
    mask = tree.root / "grid" / "ground_truth" / "bent" / "001_mask.png"
    mask.write_bytes(mask.read_bytes()[: mask.stat().st_size // 2])
    with pytest.raises(MVTecCaptionError, match=rf"{mask} is not a readable image"):
        _build("ad", tree.root, tree.captions_path, tmp_path / "cache2")


@pytest.mark.parametrize("damage", ["cut to 20 bytes", "not an image"])
def test_cli_refuses_a_damaged_png_by_name(tmp_path, small, damage):
    tree = small("ad")
    image = tree.root / "screw" / "train" / "good" / "001.png"
    image.write_bytes(image.read_bytes()[:20] if damage == "cut to 20 bytes" else b"<html>not found</html>")
    output = tmp_path / "out"
    assert_refused(main, _cli_build(tree, output, tmp_path / "cache"), str(image), [output, tree.root])


def test_anomaly_with_an_all_zero_mask_is_named(tmp_path, small):
    tree = small("loco")
    folder = tree.root / "juice_bottle" / "ground_truth" / "logical_anomalies" / "002"
    for region in folder.glob("*.png"):
        Image.new("L", Image.open(region).size, 0).save(region)
    with pytest.raises(
        MVTecCaptionError, match=r"juice_bottle/logical_anomalies: the mask of anomaly .*002\.png is all zero"
    ):
        _build("loco", tree.root, tree.captions_path, tmp_path / "cache")


def test_cli_refuses_a_truncated_archive_by_name(tmp_path, small):
    tree = small("ad")
    archive = pack_tar_xz(tree.root, tmp_path / "mvtec_anomaly_detection.tar.xz")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    output = tmp_path / "out"
    line = assert_refused(
        main, _cli_build(tree, output, tmp_path / "cache", data_dir=archive), [str(archive), "truncated"],
        [output, archive],
    )  # fmt: skip
    assert "Download it again" in line
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_dir() and ".partial-" in p.name]


def test_interrupted_extraction_is_never_reused(tmp_path, small, monkeypatch):
    """A killed extraction leaves only a temporary folder; the next run extracts afresh and builds every
    normal image. A thinned extracted copy is refused against the archive's own counts."""
    import tarfile

    import mvtec_caption.archive as archive_module

    tree = small("ad")
    archive = pack_tar_xz(tree.root, tmp_path / "mvtec_anomaly_detection.tar.xz")
    real_extract = tarfile.TarFile.extract
    calls = []

    def killed_after_five(self, member, *args, **kwargs):
        calls.append(member.name)
        if len(calls) > 5:
            raise KeyboardInterrupt  # as a kill: no clean-up
        return real_extract(self, member, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(tarfile.TarFile, "extract", killed_after_five)
        patch.setattr(archive_module.shutil, "rmtree", lambda *a, **k: None)
        with pytest.raises(KeyboardInterrupt):
            _build("ad", archive, tree.captions_path, tmp_path / "cache")
    assert [p for p in (tmp_path / "cache").rglob(".*partial-*") if p.is_dir()]
    ds = _build("ad", archive, tree.captions_path, tmp_path / "cache")
    assert ds["train"].num_rows == sum(1 for _ in tree.root.glob("*/train/good/*.png")) == 6
    assert not [p for p in (tmp_path / "cache").rglob(".*partial-*") if p.is_dir()]
    extracted = next(p for p in (tmp_path / "cache").rglob("mvtec_anomaly_detection.tar.xz-*") if p.is_dir())
    (extracted / "grid" / "train" / "good" / "001.png").unlink()
    builder = MVTecCaption(
        config_name="ad",
        data_dir=str(archive),
        captions=str(tree.captions_path),
        cache_dir=str(tmp_path / "cache"),
    )
    with pytest.raises(MVTecCaptionError, match=r"grid/train/good holds 1 of the archive's 2 files"):
        builder.download_and_prepare(download_mode="reuse_cache_if_exists")  # rebuild, same extraction
