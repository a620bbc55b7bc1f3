"""train_vit.py and evaluate_vit.py end to end: a real Trainer run of a tiny from-scratch ViT on real
X-rays (small_prepared: 42 train, 14 validation, 24 test images at 64 px), then everything a user
gets out of it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from tiny_vit import TINY_VIT

REPO = Path(__file__).resolve().parent.parent

TINY_CONFIG = {
    "config_overrides": TINY_VIT,
    "use_cpu": True, "seed": 42, "per_device_train_batch_size": 8, "per_device_eval_batch_size": 16,
    "learning_rate": 0.001, "eval_strategy": "epoch", "save_strategy": "epoch", "load_best_model_at_end": True,
    "metric_for_best_model": "roc_auc", "greater_is_better": True, "threshold_rule": "youden",
    "report_to": "none", "disable_tqdm": True,
}


def split_sizes(prepared: Path) -> dict[str, int]:
    report = json.loads((prepared / "prepare_report.json").read_text())
    return {split: sum(counts.values()) for split, counts in report["prepared"].items()}


def load_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.fixture(scope="module")
def trained(small_prepared, tmp_path_factory):
    """One real run: a YAML file (5 epochs, another output folder) overridden on the command line."""
    import train_vit

    folder = tmp_path_factory.mktemp("train")
    config_file = folder / "tiny.yaml"
    config_file.write_text(yaml.safe_dump({
        **TINY_CONFIG, "data_dir": str(small_prepared), "output_dir": str(folder / "from_yaml"), "num_train_epochs": 5,
    }))
    output = folder / "run"
    argv = [str(config_file), "--num_train_epochs", "2", "--output_dir", str(output)]
    results = train_vit.main(argv)
    return {"output": output, "results": results, "argv": argv, "folder": folder, "prepared": small_prepared}


def test_cli_overrides_the_yaml_file(trained):
    output = trained["output"]
    assert not (trained["folder"] / "from_yaml").exists()
    checkpoints = sorted(output.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    assert len(checkpoints) == 2  # one per epoch, 2 epochs (the file said 5)
    state = json.loads((checkpoints[-1] / "trainer_state.json").read_text())
    assert state["epoch"] == 2.0
    assert state["global_step"] == 2 * -(-split_sizes(trained["prepared"])["train"] // 8)
    assert len([entry for entry in state["log_history"] if "eval_roc_auc" in entry]) == 2


def test_output_folder_contents(trained):
    output = trained["output"]
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "README.md",
                 "validation_metrics.json", "test_metrics.json", "domain_stats.safetensors"):
        assert (output / name).is_file(), name
    # The kind network does not depend on the classifier: the bundled one, byte for byte, so the app runs every rule.
    bundled = REPO / "models" / "pneumonia-vit-tiny" / "domain_check.safetensors"
    assert (output / "domain_check.safetensors").read_bytes() == bundled.read_bytes()
    for split in ("validation", "test"):
        for plot in ("confusion_matrix", "roc"):
            with Image.open(output / f"{split}_{plot}.png") as image:
                assert image.format == "PNG" and min(image.size) > 100

    config = json.loads((output / "config.json").read_text())
    assert ("calibration" in config) == (output / "calibration.png").is_file()  # the reliability diagram where calibrated
    assert 0 < config["decision_threshold"] < 1
    assert config["threshold_rule"] == "youden"
    assert config["id2label"] == {"0": "NORMAL", "1": "PNEUMONIA"}
    assert (config["image_size"], config["hidden_size"], config["num_hidden_layers"]) == (64, 32, 2)
    processor = json.loads((output / "preprocessor_config.json").read_text())
    assert processor["size"] == {"height": 64, "width": 64}
    assert processor["image_mean"] == processor["image_std"] == [0.5, 0.5, 0.5]


def test_metrics_cover_each_split_once_at_the_stored_threshold(trained):
    output, results = trained["output"], trained["results"]
    sizes = split_sizes(trained["prepared"])
    threshold = json.loads((output / "config.json").read_text())["decision_threshold"]
    for split in ("validation", "test"):
        metrics = json.loads((output / f"{split}_metrics.json").read_text())
        assert metrics["n"] == sizes[split] == sum(metrics["confusion_matrix"].values())
        assert metrics["threshold"] == threshold
        assert metrics["confusion_matrix"] == results[split]["confusion_matrix"]
        assert {k: v for k, v in metrics.items() if k != "confusion_matrix"} == pytest.approx(
            {k: v for k, v in results[split].items() if k != "confusion_matrix"}, nan_ok=True)
        assert 0 <= metrics["roc_auc"] <= 1


def test_model_card(trained):
    output = trained["output"]
    card = (output / "README.md").read_text()
    threshold = json.loads((output / "config.json").read_text())["decision_threshold"]
    front_matter = yaml.safe_load(card.split("---")[1])
    assert front_matter["license"] == "cc-by-4.0"
    assert front_matter["pipeline_tag"] == "image-classification"
    assert "base_model" not in front_matter  # trained from scratch
    test_metrics = json.loads((output / "test_metrics.json").read_text())
    reported = {m["type"]: m["value"] for m in front_matter["model-index"][0]["results"][0]["metrics"]}
    assert reported["accuracy"] == round(test_metrics["accuracy"], 4)
    assert "not a medical device" in card
    assert "CC BY 4.0" in card and "Kermany" in card and "Cell 172(5):1122-1131" in card
    assert f"{threshold:.4f}" in card and "decision_threshold" in card and "`youden`" in card
    sizes = split_sizes(trained["prepared"])
    assert f"test ({sizes['test']})" in card and f"validation ({sizes['validation']})" in card
    assert "--num_train_epochs 2" in card  # the command that made it
    assert "## Out-of-domain check" in card and "`domain_check.safetensors` copied from" in card


def best_checkpoint(output: Path) -> Path:
    last = max(output.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    return Path(json.loads((last / "trainer_state.json").read_text())["best_model_checkpoint"])


def test_saved_model_is_the_best_checkpoint_with_its_calibration_folded_into_the_head(trained, calibrated_run):
    """load_best_model_at_end: the weights saved at the end are the best checkpoint's, every tensor; where the run
    calibrated, the head's logit rows are scaled by the slope and PNEUMONIA's bias shifted by the intercept."""
    import torch

    for output in (trained["output"], calibrated_run["output"]):
        best = best_checkpoint(output)
        assert best.parent == output
        final, reference = load_tensors(output / "model.safetensors"), load_tensors(best / "model.safetensors")
        assert final.keys() == reference.keys()
        calibration = json.loads((output / "config.json").read_text()).get("calibration")
        if calibration:
            slope, intercept = calibration["slope"], calibration["intercept"]
            reference["classifier.weight"] = slope * reference["classifier.weight"]
            reference["classifier.bias"] = slope * reference["classifier.bias"] + torch.tensor([0.0, intercept])
        for name in final:
            assert np.allclose(final[name].numpy(), reference[name].numpy(), atol=1e-6, rtol=0), name
            assert np.array_equal(final[name].numpy(), reference[name].numpy()) or name.startswith("classifier."), name


@pytest.fixture(scope="module")
def calibrated_run(data_root, tmp_path_factory):
    """A run whose validation scores a calibration can be fitted on: 240 real train films, 6 epochs without
    augmentation (a tiny model's scores must rank validation's classes in every fold of the method's choice)."""
    from real_subset import prepared_subset

    import train_vit

    folder = tmp_path_factory.mktemp("calibrated")
    prepared = prepared_subset(data_root, folder, {"train": (120, 120), "test": (12, 12)})
    output = folder / "run"
    train_vit.main(tiny_run_argv(prepared, output, "--num_train_epochs", "6", "--augment", "false",
                                 "--learning_rate", "0.002", "--per_device_train_batch_size", "16"))
    return {"output": output, "prepared": prepared}


def test_the_run_calibrates_on_validation_and_every_test_decision_stays_as_before(calibrated_run):
    """The saved model's P(PNEUMONIA) is the calibrated map of the uncalibrated (best checkpoint's) P, and at the
    stored threshold it decides every test film as the uncalibrated model did at the threshold chosen on validation."""
    from scipy.special import expit, logit

    from pneumonia_vit.training.evaluation import choose_threshold

    output, prepared = calibrated_run["output"], calibrated_run["prepared"]
    config = json.loads((output / "config.json").read_text())
    calibration = config["calibration"]
    assert calibration["fitted_on"] == "validation" and calibration["slope"] > 0
    best = best_checkpoint(output)
    old_threshold = choose_threshold(*fp32_scores(best, prepared), "youden")
    assert config["decision_threshold"] == pytest.approx(
        expit(calibration["slope"] * logit(old_threshold) + calibration["intercept"]), abs=1e-9)
    labels, uncalibrated = fp32_scores(best, prepared, "test")
    _, calibrated = fp32_scores(output, prepared, "test")
    assert np.allclose(calibrated, expit(calibration["slope"] * logit(uncalibrated) + calibration["intercept"]), atol=1e-5)
    assert not np.allclose(calibrated, uncalibrated, atol=1e-3)  # the map moved the probabilities
    decisions = calibrated >= config["decision_threshold"]
    assert np.array_equal(decisions, uncalibrated >= old_threshold)
    reported = json.loads((output / "test_metrics.json").read_text())["confusion_matrix"]
    assert (reported["tp"], reported["fp"]) == (int((decisions & (labels == 1)).sum()), int((decisions & (labels == 0)).sum()))
    card = (output / "README.md").read_text()
    assert "## Calibration" in card and (output / "calibration.png").stat().st_size > 0


def test_averaging_the_last_checkpoints_of_a_finished_run(trained, tmp_path):
    """--average_last_checkpoints on a finished run, resumed at its end: no training step, and every saved
    tensor is the mean of the last two checkpoints' weights; the threshold is chosen again on the average."""
    from transformers import ViTForImageClassification

    import train_vit

    output = tmp_path / "averaged"
    shutil.copytree(trained["output"], output)
    train_vit.main(trained["argv"] + ["--output_dir", str(output), "--resume_from_checkpoint", "last",
                                      "--average_last_checkpoints", "2"])
    checkpoints = sorted(output.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    assert len(checkpoints) == 2  # resuming at the end trained nothing, saved nothing
    expected = [ViTForImageClassification.from_pretrained(folder).state_dict() for folder in checkpoints]
    averaged = ViTForImageClassification.from_pretrained(output).state_dict()
    differs = False
    for name, tensor in averaged.items():
        mean = (expected[0][name] + expected[1][name]) / 2
        assert np.allclose(tensor.numpy(), mean.numpy(), atol=1e-6), name
        differs |= not np.allclose(tensor.numpy(), expected[0][name].numpy(), atol=1e-6)
    assert differs  # the two epochs' weights differ, so the average is neither of them
    validation = json.loads((output / "validation_metrics.json").read_text())
    assert validation["threshold"] == json.loads((output / "config.json").read_text())["decision_threshold"]


def test_averaging_refuses_a_save_limit_that_would_delete_its_checkpoints(trained, tmp_path):
    import train_vit

    output = tmp_path / "run"
    with pytest.raises(ValueError, match="needs --save_total_limit of at least 4"):
        train_vit.main(trained["argv"] + ["--output_dir", str(output), "--average_last_checkpoints", "3",
                                          "--save_total_limit", "2"])
    assert not output.exists()  # refused before anything was written


def test_saved_model_loads_in_classifier_and_pipeline_alike(trained, data_root, tmp_path):
    from transformers import pipeline

    from pneumonia_vit.images import load_xray
    from pneumonia_vit.inference.classifier import Classifier

    output = trained["output"]
    config = json.loads((output / "config.json").read_text())
    hub_style = pipeline("image-classification", model=str(output), device="cpu")
    assert hub_style.model.config.decision_threshold == config["decision_threshold"]

    prepared = sorted((trained["prepared"] / "test" / "PNEUMONIA").iterdir())[:2] + sorted(
        (trained["prepared"] / "test" / "NORMAL").iterdir())[:2]
    originals = [data_root / "chest_xray_originals" / "test" / "NORMAL" / "IM-0001-0001.jpeg",
                 data_root / "chest_xray_originals" / "train" / "PNEUMONIA" / "person1010_virus_1695.jpeg"]  # RGB JPEG

    def pipeline_scores(paths):
        return np.array([{row["label"]: row["score"] for row in rows}["PNEUMONIA"]
                         for rows in hub_style([str(path) for path in paths])])

    # The fp32 PyTorch path: the same pixels (64 px PNGs need no resize) give the same probabilities.
    # Originals differ only by the RGB->grey conversion the pipeline skips (it feeds the RGB channels),
    # which the resize to 64 px averages away (measured: under 1e-7).
    exact = Classifier.load(str(output), fast=False)
    assert exact.backend.name == "torch-fp32"
    assert exact.threshold == config["decision_threshold"] and exact.spec.size == 64
    for paths, tolerance in ((prepared, 1e-5), (originals, 1e-4)):
        ours = exact.pneumonia_probability([load_xray(path) for path in paths])
        assert np.allclose(ours, pipeline_scores(paths), atol=tolerance), (ours, pipeline_scores(paths))

    # The default serving path (int8 ONNX Runtime where installed) stays close to the fp32 model.
    served = Classifier.load(str(output), cache=tmp_path / "cache")
    assert served.threshold == config["decision_threshold"]
    paths = prepared + originals
    ours = served.pneumonia_probability([load_xray(path) for path in paths])
    assert np.allclose(ours, pipeline_scores(paths), atol=0.01), (served.backend.name, ours, pipeline_scores(paths))


def test_evaluate_vit_reproduces_the_test_metrics(trained, tmp_path):
    import evaluate_vit

    output = trained["output"]
    metrics = evaluate_vit.main(["--model", str(output), "--data_dir", str(trained["prepared"]), "--split", "test",
                                 "--output_dir", str(tmp_path), "--batch_size", "7"])
    written = json.loads((tmp_path / "test_metrics.json").read_text())
    expected = json.loads((output / "test_metrics.json").read_text())
    assert written == metrics
    assert written["confusion_matrix"] == expected["confusion_matrix"]
    assert written["n"] == expected["n"] and written["threshold"] == expected["threshold"]
    assert {k: v for k, v in written.items() if k != "confusion_matrix"} == pytest.approx(
        {k: v for k, v in expected.items() if k != "confusion_matrix"}, abs=1e-6)
    for plot in ("test_confusion_matrix.png", "test_roc.png"):
        assert (tmp_path / plot).stat().st_size > 0


def test_evaluate_vit_centre_crop_scores_the_middle_of_every_film(trained, tmp_path):
    import evaluate_vit
    from pneumonia_vit.training.data import centre_crop

    # The middle 40% of a film whose middle half is white and whose margin is black is all white.
    film = Image.new("L", (200, 100), 0)
    film.paste(255, (50, 25, 150, 75))
    assert np.asarray(centre_crop(film, 0.4, 32)).min() == 255
    assert np.asarray(centre_crop(film, 1.0, 32)).min() == 0

    arguments = ["--model", str(trained["output"]), "--data_dir", str(trained["prepared"]), "--split", "validation"]
    whole = evaluate_vit.main([*arguments, "--output_dir", str(tmp_path / "whole")])
    middle = evaluate_vit.main([*arguments, "--output_dir", str(tmp_path / "middle"), "--centre_crop", "0.6"])
    assert middle["n"] == whole["n"] and middle["threshold"] == whole["threshold"]
    assert middle["roc_auc"] != whole["roc_auc"] or middle["confusion_matrix"] != whole["confusion_matrix"]
    with pytest.raises(ValueError, match=r"a centre crop is a fraction .* in \(0, 1\], got 0"):
        evaluate_vit.main([*arguments, "--output_dir", str(tmp_path / "bad"), "--centre_crop", "0"])


def test_rerun_into_a_folder_with_checkpoints_is_refused(trained):
    import train_vit

    output = trained["output"]
    before = {str(path.relative_to(output)): path.stat().st_mtime_ns for path in output.rglob("*")}
    with pytest.raises(FileExistsError, match="holds checkpoints: pass --resume_from_checkpoint last to continue, "
                                              "or --overwrite_output_dir to start again"):
        train_vit.main(trained["argv"])
    assert {str(path.relative_to(output)): path.stat().st_mtime_ns for path in output.rglob("*")} == before


def test_overwrite_clears_the_previous_run_and_nothing_else(trained, tmp_path, caplog):
    import train_vit

    output = tmp_path / "run"
    shutil.copytree(trained["output"], output)
    # The earlier run went further than the new one will: `last` must never find its checkpoint.
    newest = max(output.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    shutil.copytree(newest, output / "checkpoint-9999")
    (output / "notes.txt").write_text("the user's own file")
    (output / "domain_check.safetensors").write_bytes(b"the user's own kind model")
    with caplog.at_level("INFO", logger="pneumonia_vit.training.trainer"):
        train_vit.main([trained["argv"][0], "--num_train_epochs", "1", "--output_dir", str(output),
                        "--overwrite_output_dir", "true"])
    removed = caplog.text
    for name in ("checkpoint-9999", newest.name, "README.md", "test_metrics.json", "model.safetensors"):
        assert name in removed, name
    steps_per_epoch = -(-split_sizes(trained["prepared"])["train"] // 8)
    assert sorted(path.name for path in output.glob("checkpoint-*")) == [f"checkpoint-{steps_per_epoch}"]
    assert (output / "notes.txt").read_text() == "the user's own file"
    assert (output / "domain_check.safetensors").read_bytes() == b"the user's own kind model"  # kept, not replaced
    assert "the folder's own `domain_check.safetensors`, kept" in (output / "README.md").read_text()
    assert json.loads((output / "test_metrics.json").read_text())["n"] > 0


def fp32_scores(folder: Path, prepared: Path, split: str = "validation", crop: float = 1.0):
    """Labels and P(PNEUMONIA) of the model in `folder` on a split's films (their middle, with `crop` < 1), in fp32."""
    import torch
    from transformers import AutoModelForImageClassification

    from pneumonia_vit.inference.classifier import load_pixel_spec
    from pneumonia_vit.training.data import BatchTransform, collate, load_splits

    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    films = load_splits(prepared)[split]
    films.set_transform(BatchTransform(load_pixel_spec(folder), crop=crop))
    batch = collate([films[index] for index in range(len(films))])
    with torch.no_grad():
        scores = model(pixel_values=batch["pixel_values"]).logits.float().softmax(dim=-1)[:, 1].numpy()
    return batch["labels"].numpy(), scores


def uncalibrated_threshold(config: dict) -> float:
    """The threshold chosen on validation, before the calibration mapped it (the stored one where there is none)."""
    from scipy.special import expit, logit

    calibration = config.get("calibration")
    if calibration is None:
        return config["decision_threshold"]
    return float(expit((logit(config["decision_threshold"]) - calibration["intercept"]) / calibration["slope"]))


def tiny_run_argv(prepared: Path, output: Path, *flags: str) -> list[str]:
    return ["--data_dir", str(prepared), "--output_dir", str(output), "--num_train_epochs", "1",
            *[str(item) for key, value in TINY_CONFIG.items() for item in (f"--{key}", value)], *flags]


def test_bf16_run_chooses_its_threshold_on_the_fp32_scores_the_app_serves(small_prepared, tmp_path):
    """Under --bf16 Accelerate wraps the model's forward in autocast; scoring validation through that wrapper
    would put the stored cut-off between bf16 scores (2e-5 off on this tiny model)."""
    import train_vit
    from pneumonia_vit.training.evaluation import choose_threshold

    output = tmp_path / "bf16"
    train_vit.main(tiny_run_argv(small_prepared, output, "--bf16", "true"))
    stored = uncalibrated_threshold(json.loads((output / "config.json").read_text()))
    assert stored == pytest.approx(choose_threshold(*fp32_scores(best_checkpoint(output), small_prepared), "youden"), abs=1e-6)


def test_threshold_centre_crop_chooses_the_cut_off_on_whole_and_cropped_validation_films_together(small_prepared, tmp_path):
    import train_vit
    from pneumonia_vit.training.evaluation import choose_threshold

    with pytest.raises(ValueError, match=r"a centre crop is a fraction .* in \(0, 1\], got 1.5"):
        train_vit.main(tiny_run_argv(small_prepared, tmp_path / "refused", "--threshold_centre_crop", "1.5"))
    assert not (tmp_path / "refused").exists()  # refused before training, not after it

    output = tmp_path / "pooled"
    train_vit.main(tiny_run_argv(small_prepared, output, "--threshold_centre_crop", "0.6"))
    config = json.loads((output / "config.json").read_text())
    labels, whole = fp32_scores(best_checkpoint(output), small_prepared)
    _, middle = fp32_scores(best_checkpoint(output), small_prepared, crop=0.6)
    pooled = choose_threshold(np.concatenate([labels, labels]), np.concatenate([whole, middle]))
    assert uncalibrated_threshold(config) == pytest.approx(pooled, abs=1e-6)
    assert uncalibrated_threshold(config) != pytest.approx(choose_threshold(labels, whole), abs=1e-6)
    assert config["threshold_rule"] == "youden on whole + 0.6 centre-cropped films"
    # The reported validation figures stay those of the whole films, at that cut-off.
    reported = json.loads((output / "validation_metrics.json").read_text())
    assert reported["threshold"] == config["decision_threshold"] and reported["n"] == len(labels)


