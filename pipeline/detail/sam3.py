"""The SAM3 detector: transformers' Sam3Model / Sam3Processor, text-prompted, from a local folder.

SAM 3 (Promptable Concept Segmentation) returns every instance of a text concept as a box, a
mask and a score. The image goes through the vision backbone once; each concept then costs one
pass of the text encoder and detector heads (Sam3Model's `vision_embeds` reuse).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from pipeline.detail.detection import Concept, Detection
from pipeline.errors import ModelFileError

MASK_THRESHOLD = 0.5  # mask logits -> binary masks, as Sam3Processor's default


def inspect_detector(path: str | Path) -> Path:
    """Check that `path` is a SAM3 folder (config.json with model_type sam3) without loading weights."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelFileError(f"detector {path} does not exist; pass a SAM3 folder saved with save_pretrained")
    config = path / "config.json"
    if not path.is_dir() or not config.is_file():
        raise ModelFileError(
            f"detector {path} is not a transformers model folder (no config.json); pass a SAM3 folder "
            "holding config.json, the weights and the processor files"
        )
    try:
        model_type = json.loads(config.read_text()).get("model_type", "")
    except (OSError, json.JSONDecodeError) as err:
        raise ModelFileError(f"detector {path}: config.json is unreadable ({err})") from None
    if model_type != "sam3":
        raise ModelFileError(
            f"detector {path} holds a {model_type or 'unknown'} model, not SAM3 (model_type 'sam3'); "
            "the detailer needs a SAM3 folder (Sam3Model + Sam3Processor)"
        )
    return path


class Sam3Detector:
    """A loaded SAM3 model and processor on one device."""

    def __init__(self, path: str | Path, device: torch.device, dtype: torch.dtype = torch.float32):
        from transformers import Sam3Model, Sam3Processor

        path = inspect_detector(path)
        try:
            self.processor = Sam3Processor.from_pretrained(str(path), local_files_only=True)
            self.model = Sam3Model.from_pretrained(str(path), local_files_only=True, dtype=dtype).to(device).eval()
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise ModelFileError(f"could not load the SAM3 detector at {path}: {err}") from None
        self.device = device

    @torch.no_grad()
    def detect(self, image: torch.Tensor, concepts: Sequence[Concept]) -> list[Detection]:
        """Candidates for every concept on a [1, 3, H, W] image in [0, 1], most confident first per concept."""
        height, width = image.shape[-2:]
        pixels = (image[0].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        dtype = self.model.dtype
        vision_inputs = self.processor(images=pixels, return_tensors="pt")
        vision = self.model.get_vision_features(pixel_values=vision_inputs["pixel_values"].to(self.device, dtype))
        found: list[Detection] = []
        for concept in concepts:
            text = self.processor(text=concept.name, return_tensors="pt").to(self.device)
            outputs = self.model(
                vision_embeds=vision, input_ids=text["input_ids"], attention_mask=text["attention_mask"]
            )
            result = self.processor.post_process_instance_segmentation(
                outputs, threshold=concept.threshold, mask_threshold=MASK_THRESHOLD, target_sizes=[(height, width)]
            )[0]
            order = torch.argsort(result["scores"].float().cpu(), descending=True, stable=True)
            for i in order.tolist():
                x0, y0, x1, y1 = result["boxes"][i].float().cpu().tolist()
                box = (
                    min(max(x0 / width, 0.0), 1.0),
                    min(max(y0 / height, 0.0), 1.0),
                    min(max(x1 / width, 0.0), 1.0),
                    min(max(y1 / height, 0.0), 1.0),
                )
                mask = result["masks"][i].float().cpu()
                found.append(Detection(concept.name, concept.layer, box, mask, float(result["scores"][i])))
        return found
