"""pneumonia_vit.preprocess against the processor saved with the model, and a tiny ViT smoke test.

The app and training feed the model through `pixel_values`; a model pushed to the Hub is used
through `transformers.pipeline`, i.e. through the saved ViTImageProcessor(Pil). Both must give
the same numbers on real X-rays, or the Hub model and the app disagree.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pneumonia_vit.images import load_xray
from pneumonia_vit.preprocess import PixelSpec, pixel_values, resize_gray

# Two grey levels, in normalised units (std 0.5: one grey level is 2/255).
TOLERANCE = 2 / 255 * 2


def _real_xrays(data_root: Path) -> list[Path]:
    originals = data_root / "chest_xray_originals"
    picks = [
        *sorted((originals / "train" / "NORMAL").iterdir())[:3],  # grayscale, 1,100-2,300 px
        *sorted((originals / "test" / "NORMAL").iterdir())[:3],  # large test originals
        originals / "train" / "PNEUMONIA" / "person1010_virus_1695.jpeg",  # stored as RGB, 502x307
        originals / "train" / "PNEUMONIA" / "person1073_bacteria_3008.jpeg",  # stored as RGB
        *sorted((data_root / "chest_xray_224" / "test" / "PNEUMONIA").iterdir())[:2],  # 224 px copies
    ]
    assert all(path.is_file() for path in picks)
    return picks


@pytest.mark.parametrize("size", [64, 224])
def test_pixel_values_match_saved_processor_on_real_xrays(data_root, tmp_path, size):
    from transformers import AutoImageProcessor, ViTImageProcessorPil

    # The processor exactly as train_vit.py saves it beside the weights, loaded back.
    PixelSpec(size=size).processor().save_pretrained(tmp_path)
    processor = AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    assert isinstance(processor, ViTImageProcessorPil)
    spec = PixelSpec.from_processor(processor)
    assert spec == PixelSpec(size=size)

    grays = [load_xray(path) for path in _real_xrays(data_root)]
    assert {image.mode for image in grays} == {"L"}
    ours = pixel_values(grays, spec)
    theirs = processor(images=[image.convert("RGB") for image in grays], return_tensors="pt")["pixel_values"]
    assert ours.shape == theirs.shape == (len(grays), 3, size, size)
    assert ours.dtype == torch.float32
    difference = (ours - theirs).abs().max().item()
    assert difference <= TOLERANCE, f"max difference {difference * 255 / 2:.1f} grey levels"


def test_pixel_values_shapes_and_channels(data_root):
    spec = PixelSpec(size=32, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    grays = [load_xray(path) for path in _real_xrays(data_root)[:4]]
    assert len({image.size for image in grays}) > 1  # mixed sizes go into one batch
    batch = pixel_values(grays, spec)
    assert batch.shape == (4, 3, 32, 32)
    # Each channel is the same grey image, normalised with that channel's mean and std.
    raw = torch.stack([(batch[:, c] * spec.std[c] + spec.mean[c]) for c in range(3)], dim=1)
    assert torch.allclose(raw[:, 0], raw[:, 1], atol=1e-5) and torch.allclose(raw[:, 0], raw[:, 2], atol=1e-5)
    assert raw.min() >= -1e-6 and raw.max() <= 1 + 1e-6
    # resize_gray leaves an image already at the right size untouched.
    image = resize_gray(grays[0], 32)
    assert image.size == (32, 32) and resize_gray(image, 32) is image


def test_tiny_vit_smoke():
    """Random input through a tiny ViT: right output shape, finite loss, every weight gets a gradient."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32, num_labels=2)
    model = ViTForImageClassification(config)
    images = torch.randn(3, 3, 32, 32)
    output = model(pixel_values=images, labels=torch.tensor([0, 1, 1]))
    assert output.logits.shape == (3, 2)
    assert torch.isfinite(output.loss)
    output.loss.backward()
    missing = [name for name, parameter in model.named_parameters() if parameter.grad is None]
    # The pooler is not used by ViTForImageClassification (it reads the [CLS] token directly).
    assert not [name for name in missing if "pooler" not in name]


def test_tiny_model_dir_scores_real_xrays(tiny_model_dir, data_root, tmp_path):
    from pneumonia_vit.inference.classifier import Classifier

    classifier = Classifier.load(str(tiny_model_dir), cache=tmp_path)  # the fast path's export stays out of ~/.cache
    assert classifier.threshold == 0.42 and classifier.spec.size == 64
    grays = [load_xray(path) for path in _real_xrays(data_root)[:3]]
    probabilities = classifier.pneumonia_probability(grays)
    assert probabilities.shape == (3,)
    assert ((probabilities > 0) & (probabilities < 1)).all()
