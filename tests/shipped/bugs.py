"""Bugs as they get into shipped code: each one a small text replacement in a copy of one entry file.

``BUGS[name] = (kind, {old: new})``: ``kind`` says which deployment (``python`` the Space's
``app.py``, ``endpoint_handler`` the Endpoint's ``handler.py``, ``url`` the service's
``server.py``); the replacements are the only change between the clean and the injected run.
What the gate is expected to say about each is in the table at the top of ``test_bugs.py``.
"""

from __future__ import annotations

# The Endpoint's author copied the head "so that the endpoint needs no training code", renaming
# its layers on the way; the non-strict load then keeps the fresh initialisation of every layer.
REDECLARED_HEAD = '''from torch import nn


class TagScorer(nn.Module):
    """The tag scorer, declared here so that the endpoint needs no training code."""

    def __init__(self, embed_dim=64, n_sources=4, n_scenes=4, context_dim=6, hidden=48, n_tags=4, p_drop=0.2):
        super().__init__()
        self.source_embedding = nn.Embedding(n_sources, context_dim)
        self.scene_embedding = nn.Embedding(n_scenes, context_dim)
        self.fc1 = nn.Linear(embed_dim + 2 * context_dim, hidden)
        self.bn1 = nn.BatchNorm1d(hidden)
        self.dropout = nn.Dropout(p_drop)
        self.fc2 = nn.Linear(hidden, n_tags)

    def forward(self, embedding, input_biases):
        context = torch.cat([self.source_embedding(input_biases[:, 0]), self.scene_embedding(input_biases[:, 1])], 1)
        hidden = torch.relu(self.bn1(self.fc1(torch.cat([embedding, context], 1))))
        return self.fc2(self.dropout(hidden))
'''

APP = "python"
HANDLER = "endpoint_handler"
SERVICE = "url"

BUGS: dict[str, tuple[str, dict[str, str]]] = {
    # -- the Space (app.py): a class instance with @torch.no_grad() __call__, models in a dict, loaded lazily
    "app_input_biases_swapped": (APP, {
        "torch.tensor([[source, scene]])": "torch.tensor([[scene, source]])"}),
    "app_sigmoid_on_logits": (APP, {
        "return logits[0].tolist()": "return torch.sigmoid(logits)[0].tolist()"}),
    "app_batch_l2_norm": (APP, {
        "features = backbone.forward_head(backbone.forward_features(pixels), pre_logits=True)\n":
        "features = backbone.forward_head(backbone.forward_features(pixels), pre_logits=True)\n"
        "        features = features / features.norm()  # unit-length CLIP features\n"}),
    "app_batchnorm_train_mode": (APP, {
        'self.models["scorer"] = scorer.eval()': 'self.models["scorer"] = scorer'}),
    "app_only_grayscale_converted": (APP, {
        'image = ImageOps.exif_transpose(image).convert("RGB")\n':
        "image = ImageOps.exif_transpose(image)\n"
        '        if image.mode == "L":  # grayscale scans: the model wants three channels\n'
        '            image = image.convert("RGB")\n'}),
    "app_bilinear_resize": (APP, {
        "T.InterpolationMode.BICUBIC": "T.InterpolationMode.BILINEAR"}),
    "app_exif_ignored": (APP, {
        'ImageOps.exif_transpose(image).convert("RGB")': 'image.convert("RGB")'}),
    "app_resize_to_crop_size": (APP, {
        'T.Resize(int(size / self.config["crop_pct"]), ': "T.Resize(size, "}),
    # -- the Endpoint (handler.py): EndpointHandler(path), torchvision v2, @torch.inference_mode() __call__
    "handler_redeclared_head_strict_false": (HANDLER, {
        "from photo_tags.heads import TagScorer\n": REDECLARED_HEAD,
        "self.scorer.load_state_dict(scorer_state, strict=True)":
        "self.scorer.load_state_dict(scorer_state, strict=False)"}),
    "handler_half_backbone": (HANDLER, {
        "self.backbone.eval()": "self.backbone.half().eval()  # half the memory",
        "pixels = self.transform(image)[None]": "pixels = self.transform(image)[None].half()",
        "pre_logits=True)\n": "pre_logits=True).float()\n"}),
    "handler_imagenet_mean_std": (HANDLER, {
        "import timm\n": "import timm\nfrom timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD\n",
        'v2.Normalize(self.config["mean"], self.config["std"])':
        "v2.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)"}),
    "handler_pixels_0_255": (HANDLER, {
        "v2.ToDtype(torch.float32, scale=True)": "v2.ToDtype(torch.float32, scale=False)"}),
    "handler_jpeg_reencode_q85": (HANDLER, {
        'image = ImageOps.exif_transpose(image).convert("RGB")\n':
        'image = ImageOps.exif_transpose(image).convert("RGB")\n'
        "        buffer = io.BytesIO()  # store uploads as JPEG, as the web client does\n"
        '        image.save(buffer, format="JPEG", quality=85)\n'
        "        image = Image.open(buffer)\n"}),
    "handler_dropout_active": (HANDLER, {
        "self.scorer.eval()\n":
        "self.scorer.eval()\n"
        "        self.scorer.drop.train()  # Monte-Carlo dropout: a little spread per call for the confidence\n"}),
    "handler_forward_not_pre_logits": (HANDLER, {
        "self.backbone.forward_head(self.backbone.forward_features(pixels), pre_logits=True)":
        "self.backbone(pixels)"}),
    # -- the service (server.py): FastAPI, PIL geometry and numpy normalisation
    "service_bgr_and_squash": (SERVICE, {
        'image = self.geometry(ImageOps.exif_transpose(image).convert("RGB"))':
        'image = self.geometry(ImageOps.exif_transpose(image).convert("RGB").resize((224, 224)))',
        "array = np.asarray(image, dtype=np.float32) / 255.0":
        "array = np.asarray(image, dtype=np.float32)[..., ::-1] / 255.0  # BGR, as cv2.imread gives"}),
    "service_bgr": (SERVICE, {
        "array = np.asarray(image, dtype=np.float32) / 255.0":
        "array = np.asarray(image, dtype=np.float32)[..., ::-1] / 255.0  # BGR, as cv2.imread gives"}),
    "service_squash": (SERVICE, {
        "T.Resize(resize, ": "T.Resize((resize, resize), "}),
    "service_softmax_temperature": (SERVICE, {
        "logits = self.scorer(embedding, torch.tensor([input_biases]))[0]":
        "logits = torch.softmax(self.scorer(embedding, torch.tensor([input_biases]))[0] / 2.0, dim=-1)"}),
}

# Not a bug: the Space's __call__ under @torch.inference_mode() instead of @torch.no_grad().
INFERENCE_MODE = {"@torch.no_grad()": "@torch.inference_mode()"}
