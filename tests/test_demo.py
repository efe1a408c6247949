"""The README's main job in miniature: the whole chain runs offline and writes what a person looks at."""

import json

import numpy as np
from PIL import Image

from axf_pipeline.demo.measure import outside_mask_change, read_defect
from axf_pipeline.demo.toy_data import COLOURS, SHAPES, normal_image, paint_defect, square_mask


def test_measure_reads_every_painted_colour_and_shape_and_nothing_on_a_normal_image():
    rng = np.random.default_rng(3)
    for colour in COLOURS:
        for shape in SHAPES:
            for _ in range(5):
                normal = normal_image(rng, 32)
                mask = square_mask(rng, 32, 12)
                painted = paint_defect(normal, mask, colour, shape, rng)
                assert read_defect(painted, normal, mask)[:2] == (colour, shape)
                assert outside_mask_change(painted, normal, mask) == 0
    normal = normal_image(rng, 32)
    assert read_defect(normal, normal, square_mask(rng, 32, 12))[:2] == ("none", "none")


def test_fast_demo_runs_the_chain_and_writes_grid_metrics_and_table(tmp_path):
    from axf_pipeline import AnomalyXFusionPipeline
    from axf_pipeline.demo.run import main

    out = tmp_path / "demo"
    argv = ["--output_dir", str(out), "--vae_steps", "2", "--train_steps", "2", "--anomalies_per_type", "3",
            "--held_out_normals", "2", "--inference_steps", "2", "--synthesis_batch", "8"]  # fmt: skip
    assert main(argv) == 0

    report = json.loads((out / "metrics.json").read_text())
    (result,) = report["results"]
    assert result["num_generated"] == 2 * len(COLOURS) * len(SHAPES)
    assert result["max_outside_mask_change"] == 0
    assert 0.0 <= result["text_controllability"] <= 1.0
    assert result["ic_lpips_random_backbone"]["real_score"] is False
    grid = Image.open(result["grid"])
    assert grid.width > grid.height / len(COLOURS) and grid.height > 0
    assert "text controllability" in (out / "results.md").read_text()
    # the dataset went through the builder and export; the model through train.py's code
    assert (out / "mvtec_caption" / "README.md").is_file()
    pipe = AnomalyXFusionPipeline.from_pretrained(result["pipeline"])
    assert pipe.ddf is not None and pipe.mif.config.use_semantic
