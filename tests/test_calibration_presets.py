"""The shipped real-model calibration preset: composes, reads its files from data_dir, fails clearly."""

import json

from moeprune.profile import Profile
from tests.test_pipeline import moeprune, stage_dirs

V7 = ["generic_math", "generic_logic", "generic_code", "generic_science", "generic_creative", "generic_multilingual",
      "targeted_humaneval", "targeted_humanevalplus", "targeted_lcb_medium_55", "targeted_gpqa"]
# the tiny model has no chat template and 128 positions: keep the preset's shape, shrink its lengths
SMALL = ["calibration=reference_v7", "calibration.chat_template=false", "calibration.generate_tokens=4",
         "calibration.tiers.short.max_tokens=24", "calibration.tiers.long.max_tokens=24"]


def write_corpus(root, classes=V7):
    root.mkdir()
    for i, c in enumerate(classes):
        rows = [{"text": f"Question {i}.{j}: what is {i} plus {j}?"} for j in range(3)]
        (root / f"{c}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_reference_v7_profiles_every_class_from_data_dir(tiny_gemma4, tmp_path):
    data = write_corpus(tmp_path / "v7")
    args = [f"model.path={tiny_gemma4}", *SMALL, f"calibration.data_dir={data}", "class_weights=v7_coderx",
            "keep.experts_per_layer=6", "stage=dropmap"]
    moeprune(args, tmp_path / "cache", tmp_path / "run")
    dirs = stage_dirs(tmp_path / "run")
    profile = Profile.load(dirs["profile"])
    assert profile.classes == V7
    assert (profile.stats["count"].sum(dim=(1, 2)) > 0).all()
    summary = json.loads((dirs["dropmap"] / "summary.json").read_text())
    assert summary["class_weights"]["generic_code"] == 3.0 and summary["class_weights"]["targeted_gpqa"] == 0.0


def test_reference_v7_needs_data_dir_and_every_file(tiny_gemma4, tmp_path):
    args = [f"model.path={tiny_gemma4}", *SMALL, "stage=profile"]
    out = moeprune(args, tmp_path / "cache", tmp_path / "run", check=False)
    assert out.returncode != 0 and "calibration.data_dir" in out.stderr

    data = write_corpus(tmp_path / "v7", V7[:-1])  # no targeted_gpqa.jsonl
    out = moeprune([*args, f"calibration.data_dir={data}"], tmp_path / "cache", tmp_path / "run2", check=False)
    assert out.returncode == 2 and f"{data}/targeted_gpqa.jsonl" in out.stderr
    assert not (tmp_path / "cache" / "profile").exists() or not any((tmp_path / "cache" / "profile").iterdir())


def test_only_the_interpolation_needs_data_dir_not_a_path_that_says_data_dir(tmp_path):
    from omegaconf import OmegaConf

    from moeprune.prune.calibration import calibration_files

    own = tmp_path / "my_data_dir" / "code.jsonl"
    cfg = OmegaConf.create({"name": "mine", "data_dir": None, "tiers": {"short": {}},
                            "classes": {"generic_code": [{"kind": "jsonl", "path": str(own)}]}})
    assert calibration_files(cfg) == {"calibration.generic_code[0]": own}
