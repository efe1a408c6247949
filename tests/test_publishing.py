"""Everything written for publication is fit for the Hub as is: Hub size labels for any size, the licence
that follows the data (MVTec's, the project's for toys, the owner's or "unknown" for custom data), YAML the
card data classes accept, and no local path."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from cli_checks import assert_refused
from huggingface_hub import DatasetCard, DatasetCardData, ModelCard, ModelCardData

from axf_pipeline.publishing import content_hash, publishable_name
from mvtec_caption import export_dataset, make_custom_tree, make_sample_tree
from mvtec_caption.cards import check_card_data, check_publishable, size_category
from mvtec_caption.cli import main as dataset_main
from mvtec_caption.export import dataset_terms

# A few real-looking MVTec AD captions (no "Synthetic sample:" prefix): the tree is built as MVTec data.
CAPTIONS = {"bottle": {"broken_large": ["a large crack on the rim", "a broken bottle neck", "a chipped rim"]}}


@pytest.mark.parametrize(
    ("n", "label"),
    [
        (0, "n<1K"), (5, "n<1K"), (999, "n<1K"), (1000, "1K<n<10K"), (5_000, "1K<n<10K"),
        (50_000, "10K<n<100K"), (500_000, "100K<n<1M"), (5_000_000, "1M<n<10M"),
        (5 * 10**9, "1B<n<10B"), (10**12, "n>1T"),
    ],
)  # fmt: skip
def test_size_category_is_the_hubs_bucket_for_any_size(n, label):
    assert size_category(n) == label


@pytest.mark.parametrize(
    ("n", "label"), [(5, "n<1K"), (5_000, "1K<n<10K"), (50_000, "10K<n<100K"), (500_000, "100K<n<1M")]
)
def test_synthetic_card_labels_its_size_and_names_the_model_without_its_path(tmp_path, n, label):
    from axf_pipeline.synthesis import export

    model = tmp_path / "runs" / "my_model"
    model.mkdir(parents=True)
    (model / "model_index.json").write_text(json.dumps({"_class_name": "AnomalyXFusionPipeline"}))
    out = tmp_path / "synthetic"
    out.mkdir()
    record = {"category": "bottle", "defect_type": "broken_large"}
    items = [SimpleNamespace(record=record)] * n
    settings = {"model": str(model), "dataset": "someone/defects", "config": "ad", "seed": 0}
    settings |= {
        "steps": 2,
        "guidance_scale": 4.0,
        "reference_guidance_scale": None,
        "padding_mask_crop": None,
    }
    settings |= {"batch_size": 1, "dtype": "float32", "prompt": None, "reference": True}
    export.write_card(out, items, settings, {"made": n, "skipped": 0})
    card = DatasetCard.load(out / "README.md")
    assert card.data.size_categories == [label]
    assert card.data.license == "unknown"  # offline, the source card cannot be read: said, not guessed
    assert "mvtec" not in card.data.tags
    assert str(tmp_path) not in card.content and publishable_name(model) in card.content
    assert publishable_name(model).startswith("my_model@sha256:")


def test_publishable_name_is_the_hub_id_or_the_base_name_and_a_content_hash(tmp_path):
    assert publishable_name("runwayml/stable-diffusion-v1-5") == "runwayml/stable-diffusion-v1-5"
    assert publishable_name(tmp_path, hub_id="me/model") == "me/model"
    folder = tmp_path / "outputs" / "base"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DConditionModel"]}))
    (folder / "unet" / "w.safetensors").write_bytes(b"one")
    (folder / "checkpoint-2").mkdir()  # not part of the model: never hashed
    (folder / "checkpoint-2" / "w.safetensors").write_bytes(b"x")
    first = publishable_name(folder)
    assert first == f"base@sha256:{content_hash(folder)[:12]}" and "/" not in first
    (folder / "checkpoint-2" / "w.safetensors").write_bytes(b"y")
    assert publishable_name(folder) == first
    (folder / "unet" / "w.safetensors").write_bytes(b"two")  # retrained in place: a new name
    assert publishable_name(folder) != first


def test_card_yaml_is_checked_before_it_is_written(tmp_path, monkeypatch):
    ok = ModelCardData(
        license="apache-2.0", library_name="diffusers", tags=["a"], pipeline_tag="image-to-image"
    )
    assert check_card_data(ok) is ok
    with pytest.raises(ValueError, match="license_name"):
        check_card_data(ModelCardData(license="other", license_link="https://example.com/licence"))
    with pytest.raises(ValueError, match="size_categories"):
        check_card_data(DatasetCardData(license="mit", size_categories=["100K<n<1000K"]))
    with pytest.raises(ValueError, match="Hub licence id"):
        check_card_data(DatasetCardData(license="My own licence"))
    with pytest.raises(ValueError, match="absolute path"):
        check_card_data(ModelCardData(license="mit", base_model="/home/me/models/sd15"))
    monkeypatch.chdir(tmp_path)
    typed = "outputs/demo/base/base"  # as the user typed it, relative
    Path(typed).mkdir(parents=True)
    with pytest.raises(ValueError, match="local path"):
        check_publishable("| base model | `outputs/demo/base/base` |", [typed])
    check_publishable("| base model | `base@sha256:0123456789ab` |", [typed])


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    root = tmp_path_factory.mktemp("publishing")
    mvtec = make_sample_tree(root / "mvtec", "ad", CAPTIONS, categories=["bottle"], scale=0.02)
    json_path = root / "captions.json"
    json_path.write_text(json.dumps(CAPTIONS))
    custom = make_custom_tree(root / "custom", root / "custom.json")
    return SimpleNamespace(root=root, mvtec=mvtec.root, captions=json_path, custom=custom)


def _card(output: Path) -> DatasetCard:
    card = DatasetCard.load(output / "README.md")
    check_card_data(card.data)  # what the Hub reads back passes the same check
    assert str(output.parent) not in card.content
    return card


@pytest.fixture(scope="module")
def exports(trees):
    """MVTec data, the same images built as toy data, and a custom tree as two configs: with a stated
    licence and without."""
    cache = trees.root / "cache"
    real = export_dataset("ad", trees.mvtec, trees.root / "real", trees.captions, cache_dir=cache)
    toy = export_dataset("ad", trees.mvtec, trees.root / "toy", trees.captions, cache_dir=cache, toy=True)
    custom = trees.root / "custom_export"
    base = ["build", "--config", "custom", "--data-dir", str(trees.custom.root), "--output", str(custom),
            "--captions", str(trees.custom.captions_path), "--cache-dir", str(cache)]  # fmt: skip
    assert dataset_main([*base, "--name", "stated", "--license", "cc-by-4.0"]) == 0
    assert dataset_main([*base, "--name", "unstated"]) == 0
    return SimpleNamespace(real=real, toy=toy, custom=custom, custom_argv=base)


def test_mvtec_data_is_carded_with_mvtecs_licence_and_toy_data_as_a_toy(exports):
    card = _card(exports.real)
    assert card.data.license == "cc-by-nc-sa-4.0" and "mvtec" in card.data.tags
    assert card.data.size_categories == ["n<1K"] and "1,258 captions" in card.text
    assert dataset_terms(exports.real, "ad") == {"license": "cc-by-nc-sa-4.0", "toy": False, "mvtec": True}
    card = _card(exports.toy)
    assert card.data.license == "apache-2.0" and "toy" in card.data.tags and "mvtec" not in card.data.tags
    assert "Toy data" in card.text and "1,258" not in card.text and "CC BY-NC-SA" not in card.text
    assert dataset_terms(exports.toy, "ad") == {"license": "apache-2.0", "toy": True, "mvtec": False}


def test_custom_data_has_the_licence_its_owner_states_or_unknown(trees, exports):
    output = exports.custom
    assert_refused(dataset_main, [*exports.custom_argv, "--license", "Our own terms"], "--license", [output])
    assert_refused(
        dataset_main, ["build", "--config", "ad", "--data-dir", str(trees.mvtec), "--license", "mit",
                       "--output", str(output)], "cc-by-nc-sa-4.0", [output],
    )  # fmt: skip
    card = _card(output)
    assert card.data.license == ["cc-by-4.0", "unknown"] and "mvtec" not in card.data.tags
    assert "| `stated` | cc-by-4.0 |" in card.text and "| `unstated` | unknown |" in card.text
    assert "1,258" not in card.text
    assert dataset_terms(output, "stated")["license"] == "cc-by-4.0"
    assert dataset_terms(output, "unstated")["license"] == "unknown"


@pytest.mark.parametrize(
    ("data", "config", "flags", "license", "says"),
    [
        ("real", "ad", [], "cc-by-nc-sa-4.0", "MVTec AD / MVTec LOCO (CC BY-NC-SA 4.0"),
        ("toy", "ad", [], "apache-2.0", "Toy model"),
        ("custom", "stated", [], "cc-by-4.0", "follows that data's terms"),
        ("custom", "unstated", [], "unknown", "states no licence"),
        ("custom", "unstated", ["--license", "mit"], "mit", "as stated by whoever trained it"),
    ],
)
def test_a_models_licence_follows_its_data_unless_stated(
    exports, tmp_path, monkeypatch, data, config, flags, license, says
):
    from axf_pipeline.training import parse_args
    from axf_pipeline.training.export import write_model_card

    monkeypatch.chdir(getattr(exports, data).parent)  # paths typed relative, as a user types them
    base = tmp_path / "models" / "base"
    base.mkdir(parents=True)
    (base / "model_index.json").write_text("{}")
    argv = ["--pretrained_model_name_or_path", str(base), "--image_encoder", "openai/clip-vit-large-patch14",
            "--dataset_name", getattr(exports, data).name, "--dataset_config", config,
            "--output_dir", str(tmp_path / "run"), *flags]  # fmt: skip
    (tmp_path / "card").mkdir()
    card = write_model_card(parse_args(argv), tmp_path / "card", 3, 6, 1)
    assert card.data.license == license and says in card.text
    assert ("toy" in card.data.tags) == (data == "toy") and ("mvtec" in card.data.tags) == (data == "real")
    assert card.data.base_model is None and card.data.datasets is None  # local: no Hub id to link
    assert str(tmp_path) not in card.content and f"`{publishable_name(base)}`" in card.content
    check_card_data(ModelCard.load(tmp_path / "card" / "README.md").data)


def test_a_saved_or_pushed_pipeline_names_no_local_folder(tmp_path, monkeypatch):
    from diffusers.utils import hub_utils

    from axf_pipeline import AnomalyXFusionPipeline
    from axf_pipeline.tiny import build_tiny_components

    AnomalyXFusionPipeline(**build_tiny_components()).save_pretrained(tmp_path / "first")
    pipe = AnomalyXFusionPipeline.from_pretrained(tmp_path / "first")  # records where it came from
    assert str(tmp_path) in json.dumps(dict(pipe.unet.config))

    def texts(folder: Path) -> dict[str, str]:
        return {p.relative_to(folder).as_posix(): p.read_text() for p in folder.rglob("*.json")}

    pipe.save_pretrained(tmp_path / "second")
    saved = texts(tmp_path / "second")
    assert "unet/config.json" in saved and not [n for n, t in saved.items() if str(tmp_path) in t]
    from diffusers.pipelines import pipeline_utils
    from huggingface_hub import ModelCard

    uploads = []
    for module in (hub_utils, pipeline_utils):
        monkeypatch.setattr(module, "create_repo", lambda repo_id, **kw: SimpleNamespace(repo_id=repo_id))
    monkeypatch.setattr(pipeline_utils, "load_or_create_model_card", lambda *a, **kw: ModelCard("---\n---\n"))
    monkeypatch.setattr(
        hub_utils.PushToHubMixin,
        "_upload_folder",
        lambda self, d, repo_id, **kw: uploads.append(texts(Path(d))),
    )
    pipe.push_to_hub("someone/axf-tiny", token="x")
    pipe.save_pretrained(str(tmp_path / "third"), push_to_hub=True, repo_id="someone/axf-tiny", token="x")
    assert len(uploads) == 2
    for uploaded in uploads:
        assert "unet/config.json" in uploaded and not [n for n, t in uploaded.items() if str(tmp_path) in t]
