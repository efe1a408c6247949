#!/usr/bin/env bash
# The package as a user gets it (run by scripts/test.sh, inside the test venv): build the wheel from a copy of
# the sources, install it into a fresh virtual environment (its dependencies come from the test venv, so nothing
# is downloaded) and, from a folder outside the source tree, build a dataset with its card, render a synthetic
# dataset card and reach training's entry points. A runtime file left out of the wheel fails here.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# A copy, so that no stale build/ of the checkout can slip a file into the wheel.
mkdir "$work/src"
cp -r pyproject.toml README.md mvtec_caption axf_pipeline "$work/src/"
python -m pip wheel "$work/src" --no-deps --no-build-isolation -q -w "$work/dist" 2>&1 | grep -v "^\s*$" || true
python -m venv --without-pip "$work/venv"
fresh="$work/venv/bin/python"
# The test venv's packages as a plain path entry: its editable install of this project is not activated.
deps=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$fresh" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' | xargs -I{} sh -c "echo '$deps' > {}/test_venv_deps.pth"
python -m pip --python "$fresh" install -q --no-deps --no-index "$work"/dist/*.whl
cd "$work"
export PYTHONPATH= HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HOME="$work/hf_home"
"$fresh" - <<'EOF'
import pathlib, sys
import axf_pipeline, mvtec_caption
for module in (axf_pipeline, mvtec_caption):
    assert pathlib.Path(module.__file__).is_relative_to(pathlib.Path(sys.prefix)), module.__file__
from mvtec_caption import make_custom_tree
make_custom_tree("tree", "captions.json")
EOF
"$work/venv/bin/mvtec-caption" build --config custom --data-dir tree --captions captions.json --output export \
  --name mine --license cc-by-4.0 --cache-dir cache >/dev/null
grep -q "^license: cc-by-4.0" export/README.md
"$work/venv/bin/axf" train --help >/dev/null
"$fresh" -m axf_pipeline.training --help >/dev/null
"$fresh" -m accelerate.commands.launch --num_processes 1 -m axf_pipeline.training --help >/dev/null
"$fresh" - <<'EOF'
import pathlib, types
from axf_pipeline.synthesis.export import write_card
out = pathlib.Path("synthetic"); out.mkdir()
settings = dict(model="someone/model", dataset="export", config="mine", seed=0, steps=2, guidance_scale=4.0,
                reference_guidance_scale=None, padding_mask_crop=None, batch_size=1, dtype="float32",
                prompt=None, reference=True)
write_card(out, [types.SimpleNamespace(record={"category": "gizmo", "defect_type": "dent"})], settings, {})
assert "license: cc-by-4.0" in (out / "README.md").read_text()
EOF
echo "scripts/check_wheel.sh: the wheel installs into a fresh venv and runs outside the source tree"
