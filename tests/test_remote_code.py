"""A saved pipeline folder carries its own code: ``DiffusionPipeline.from_pretrained(folder,
trust_remote_code=True)`` loads it where ``axf_pipeline`` is not importable and samples the same image, while
``AnomalyXFusionPipeline.from_pretrained`` keeps loading the package's classes and runs nothing from the folder."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DiffusionPipeline

import axf_pipeline
from axf_pipeline import AnomalyXFusionPipeline, DynamicDifFusion, MultiModalInFusion
from axf_pipeline.remote_code import bundle
from axf_pipeline.tiny import build_tiny_components

STEPS = 2
CODE_FILES = ["ddf/dynamic_dif_fusion.py", "mif/multimodal_in_fusion.py", "pipeline_anomaly_x_fusion.py"]

# Run in a fresh interpreter: axf_pipeline and mvtec_caption cannot be imported (the venv's editable install
# included), the working directory is outside the repository, and -I drops PYTHONPATH and the user site.
REMOTE = textwrap.dedent(
    """
    import sys

    class Hidden:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("axf_pipeline", "mvtec_caption"):
                raise ImportError(f"{name} is not installed here")

    sys.meta_path.insert(0, Hidden())
    try:
        import axf_pipeline
        raise SystemExit("axf_pipeline is importable: the test would prove nothing")
    except ImportError:
        pass

    import numpy as np, PIL.Image, torch
    from diffusers import DiffusionPipeline

    folder, out = sys.argv[1], sys.argv[2]
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    image = PIL.Image.open(f"{out}/image.png")
    mask = PIL.Image.open(f"{out}/mask.png")
    result = pipe("a scratch", image=image, mask_image=mask, reference_image=image, reference_mask=mask,
                  num_inference_steps=STEPS, guidance_scale=2.0, generator=torch.Generator().manual_seed(3),
                  output_type="np")
    np.save(f"{out}/remote.npy", result.images)
    pipe.save_pretrained(f"{out}/resaved")
    loaded = [m for m in sys.modules if m.split(".")[0] in ("axf_pipeline", "mvtec_caption")]
    print("CLASSES", type(pipe).__module__, type(pipe.mif).__module__, type(pipe.ddf).__module__, loaded)
    """
).replace("STEPS", str(STEPS))


def sample(pipe, image, mask) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        "a scratch",
        image=image,
        mask_image=mask,
        reference_image=image,
        reference_mask=mask,
        num_inference_steps=STEPS,
        guidance_scale=2.0,
        generator=torch.Generator().manual_seed(3),
        output_type="np",
    ).images


def image_and_mask():
    rng = np.random.default_rng(0)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:20, 10:22] = 255
    return PIL.Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)), PIL.Image.fromarray(mask)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("remote") / "model"
    AnomalyXFusionPipeline(**build_tiny_components()).save_pretrained(folder)
    return folder


def imports(path) -> list[tuple[int, str]]:
    """(level, module) of every import statement in a file, nested ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            found.append((node.level, node.module or ""))
        elif isinstance(node, ast.Import):
            found += [(0, alias.name) for alias in node.names]
    return found


def test_the_folder_records_its_code_the_way_diffusers_finds_remote_code(saved):
    index = json.loads((saved / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_anomaly_x_fusion", "AnomalyXFusionPipeline"]
    assert index["mif"] == ["multimodal_in_fusion", "MultiModalInFusion"]
    assert index["ddf"] == ["dynamic_dif_fusion", "DynamicDifFusion"]
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and "_name_or_path" not in index
    assert sorted(str(p.relative_to(saved)) for p in saved.rglob("*.py")) == CODE_FILES
    for name in CODE_FILES:
        found = imports(saved / name)
        assert not [m for level, m in found if level or m.split(".")[0] in ("axf_pipeline", "mvtec_caption")]
        assert str(saved) not in (saved / name).read_text()  # nothing local is written for publication
        assert os.path.dirname(axf_pipeline.__file__) not in (saved / name).read_text()


def test_loaded_without_the_package_it_samples_the_same_image(saved, tmp_path):
    image, mask = image_and_mask()
    image.save(tmp_path / "image.png")
    mask.save(tmp_path / "mask.png")
    loaded = AnomalyXFusionPipeline.from_pretrained(saved)
    assert type(loaded) is AnomalyXFusionPipeline
    assert type(loaded.mif) is MultiModalInFusion and type(loaded.ddf) is DynamicDifFusion
    expected = sample(loaded, image, mask)

    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    run = subprocess.run(
        [sys.executable, "-I", "-c", REMOTE, str(saved), str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    line = next(line for line in run.stdout.splitlines() if line.startswith("CLASSES"))
    assert line.split(" ", 4)[1:] == [
        "diffusers_modules.local.pipeline_anomaly_x_fusion",
        "diffusers_modules.local.multimodal_in_fusion",
        "diffusers_modules.local.dynamic_dif_fusion",
        "[]",
    ]
    assert "Expected types" not in run.stderr  # diffusers' type check accepts the folder's own classes
    np.testing.assert_allclose(np.load(tmp_path / "remote.npy"), expected, atol=1e-5)

    # Saved again from the remote code: the same code files, and the package loads that folder too.
    resaved = tmp_path / "resaved"
    for name in CODE_FILES:
        assert (resaved / name).read_text() == (saved / name).read_text()
    np.testing.assert_allclose(sample(AnomalyXFusionPipeline.from_pretrained(resaved), image, mask), expected)


def test_the_package_loader_runs_no_code_from_the_folder_and_the_generic_one_asks_for_trust(saved, tmp_path):
    tampered = tmp_path / "tampered"
    shutil.copytree(saved, tampered)
    for name in CODE_FILES:
        with open(tampered / name, "a") as f:
            f.write('\nraise RuntimeError("the folder\'s code ran")\n')
    pipe = AnomalyXFusionPipeline.from_pretrained(tampered)
    assert type(pipe.mif) is MultiModalInFusion
    with pytest.raises(ValueError, match="trust_remote_code=True"):  # refused before any code is copied
        DiffusionPipeline.from_pretrained(tampered)


def test_a_folder_saved_before_the_code_was_carried_still_loads(saved, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(saved, old)
    for name in CODE_FILES:
        (old / name).unlink()
    index = json.loads((old / "model_index.json").read_text())
    index.update(
        _class_name="AnomalyXFusionPipeline",
        mif=["axf_pipeline.models.multimodal_in_fusion", "MultiModalInFusion"],
        ddf=["axf_pipeline.models.dynamic_dif_fusion", "DynamicDifFusion"],
    )
    (old / "model_index.json").write_text(json.dumps(index))
    pipe = AnomalyXFusionPipeline.from_pretrained(old)
    assert type(pipe.mif) is MultiModalInFusion and type(pipe.ddf) is DynamicDifFusion


def test_bundling_refuses_a_name_two_inlined_modules_define(tmp_path, monkeypatch):
    package = tmp_path / "clashpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "helpers.py").write_text("def scale(x):\n    return 2 * x\n")
    (package / "main.py").write_text(
        "from .helpers import scale as helper_scale\n\n\ndef scale(x):\n    return x\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import clashpkg.main

    with pytest.raises(RuntimeError, match="scale is defined in both clashpkg"):
        bundle(clashpkg.main)


def serve_as_hub_repo(monkeypatch, folder, repo="someone/axf-tiny"):
    """diffusers' Hub calls answered from ``folder`` (no network in tests): the file listing, single files."""
    from types import SimpleNamespace

    from diffusers.pipelines import pipeline_utils
    from diffusers.utils import dynamic_modules_utils

    files = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()]
    info = SimpleNamespace(siblings=[SimpleNamespace(rfilename=f) for f in files], sha="0" * 40)

    def download(repo_id, filename, subfolder=None, **kwargs):
        assert repo_id == repo
        return str(folder / (f"{subfolder}/{filename}" if subfolder else filename))

    for module in (pipeline_utils, dynamic_modules_utils):
        monkeypatch.setattr(module, "model_info", lambda repo_id, **kwargs: info)
        monkeypatch.setattr(module, "hf_hub_download", download)
    return repo


@pytest.fixture
def modules_cache(tmp_path, monkeypatch):
    """diffusers copies remote code into its modules cache: a temporary one, not the user's."""
    monkeypatch.setattr("diffusers.utils.dynamic_modules_utils.HF_MODULES_CACHE", str(tmp_path / "modules"))


def test_a_pushed_folder_loads_from_the_hub_both_ways(saved, monkeypatch, modules_cache):
    """diffusers' Hub download accepts only components it can find code for: with the package's module paths in
    model_index.json (the layout before the folder carried code) it refused a pushed pipeline outright."""
    repo = serve_as_hub_repo(monkeypatch, saved)
    pipe = AnomalyXFusionPipeline.from_pretrained(repo)
    assert type(pipe.mif) is MultiModalInFusion
    remote = DiffusionPipeline.from_pretrained(repo, trust_remote_code=True)
    assert (
        type(remote).__module__.startswith("diffusers_modules.")
        and type(remote).__name__ == pipe.__class__.__name__
    )
    image, mask = image_and_mask()
    np.testing.assert_allclose(sample(remote, image, mask), sample(pipe, image, mask), atol=1e-5)


def test_without_ddf_and_reference_encoder_the_folder_loads_as_remote_code_too(tmp_path, modules_cache):
    components = build_tiny_components(use_ddf=False)
    components.update(image_encoder=None, feature_extractor=None)
    AnomalyXFusionPipeline(**components).save_pretrained(tmp_path / "model")
    assert not (tmp_path / "model" / "ddf").exists()
    index = json.loads((tmp_path / "model" / "model_index.json").read_text())
    assert index["ddf"] == [None, None] and index["mif"] == ["multimodal_in_fusion", "MultiModalInFusion"]
    remote = DiffusionPipeline.from_pretrained(tmp_path / "model", trust_remote_code=True)
    assert type(remote).__module__.startswith("diffusers_modules.") and remote.ddf is None
    image, mask = image_and_mask()
    arguments = dict(image=image, mask_image=mask, num_inference_steps=STEPS, output_type="np")
    remote.set_progress_bar_config(disable=True)
    package = AnomalyXFusionPipeline.from_pretrained(tmp_path / "model")
    package.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(
        remote("a scratch", generator=torch.Generator().manual_seed(1), **arguments).images,
        package("a scratch", generator=torch.Generator().manual_seed(1), **arguments).images,
        atol=1e-5,
    )
