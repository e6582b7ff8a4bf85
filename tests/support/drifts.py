"""The drifts injected into the bundled example's spec, each with the spec fix that undoes it.

``DRIFTS[name] = (change, fix)``: ``change`` is what `Spec.replace` takes to make the drifted candidate,
``fix`` the spec text diagnosis must print for it.
"""

from __future__ import annotations

QUICKGELU = "vit_large_patch14_clip_quickgelu_336.openai"

DRIFTS = {
    "interpolation": ({"preprocess": {"interpolation": "bilinear"}}, '[preprocess].interpolation = "bicubic"'),
    "crop_pct": ({"preprocess": {"crop_pct": 0.875}}, "[preprocess].crop_pct = 1.0"),
    "resize-size": ({"preprocess": {"input_size": (3, 224, 224)}}, "[preprocess].input_size = [3, 336, 336]"),
    "mean-std-preset": ({"preprocess": {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}},
                        "[preprocess].mean = [0.48145466, 0.4578275, 0.40821073]; "
                        "[preprocess].std = [0.26862954, 0.26130258, 0.27577711]"),
    "bgr": ({"preprocess": {"channel_order": "bgr"}}, '[preprocess].channel_order = "rgb"'),
    "resize-backend": ({"preprocess": {"resize_backend": "tensor"}}, '[preprocess].resize_backend = "pil"'),
    "extraction-mode": ({"backbone": {"extract": "forward"}}, '[backbone].extract = "pre_logits"'),
    "gelu-for-quickgelu": ({"backbone": {"model": "vit_large_patch14_clip_336.openai"}},
                           f'[backbone].model = "{QUICKGELU}"'),
    "float16": ({"runtime": {"dtype": "float16"}}, '[runtime].dtype = "float32"'),
    "bfloat16": ({"runtime": {"dtype": "bfloat16"}}, '[runtime].dtype = "float32"'),
    "exif-ignored": ({"preprocess": {"exif_transpose": False}}, "[preprocess].exif_transpose = true"),
    # The value the fixture was made without the field stands for (the identity order), not a removal: TOML.
    "input-biases-order": ({"head": {"input_biases_order": (1, 0)}}, "[head].input_biases_order = [0, 1]"),
    "l2-one-side": ({"backbone": {"normalize": "l2"}}, '[backbone].normalize = "none"'),
}
