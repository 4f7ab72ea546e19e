"""The embedded offline world (procedural images and a tiny pretrained CLIP).

- `peftbench.synth.generator`: a deterministic generator of captioned 32x32 images of 120
  (colour, shape) classes in six DomainNet-like domains, cached on disk as PNG.
- `synth-tiny`: a tiny open_clip ViT CLIP (config `synth-tiny.json`), pretrained contrastively by
  `python -m peftbench.synth.pretrain` on four of the domains and 100 of the classes; the fp16
  weights ship in this folder with `MANIFEST.json` (sha256, command, seed, zero-shot table).

Importing this package registers the backbone, so `load_backbone("synth-tiny")` loads the shipped
weights (`pretrained="default"`).
"""

from pathlib import Path

from peftbench.backbone import register_shipped_backbone

HERE = Path(__file__).resolve().parent
CONFIG_JSON = HERE / "synth-tiny.json"
WEIGHTS = HERE / "synth-tiny.safetensors"
MANIFEST = HERE / "MANIFEST.json"

register_shipped_backbone("synth-tiny", CONFIG_JSON, WEIGHTS if WEIGHTS.is_file() else None)
