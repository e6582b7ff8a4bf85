"""Checkpoint forensics: what a checkpoint holds, which architecture it implies, why it does not load."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping

import dataclasses
import re

from parity.store.checkpoints import diff_state_dict, nested_entries, remap_keys, select_state_dict
from parity.errors import CheckpointError
from parity.results import CheckpointSummary, ConfigDiff, KeyDiff, KeyFix, LayerGuess

__all__ = ["CheckpointSummary", "summarize_checkpoint", "infer_layers", "module_source", "describe_layers",
           "propose_key_fix", "diagnose_load", "summarize_structure", "diff_structure", "ABSENT"]

ABSENT = "<absent>"
_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.|$)")

# Prefixes whose origin is known, with the words that explain them.
_KNOWN_PREFIXES = {
    "module.": "saved from nn.DataParallel / DistributedDataParallel (every key starts with 'module.')",
    "_orig_mod.": "saved from a torch.compile'd module (every key starts with '_orig_mod.')",
    "model.": "saved from a training wrapper that holds the network as `model` (every key starts with 'model.')",
    "ema.": "saved from an EMA wrapper (keys start with 'ema.')",
}
_EMA_ENTRIES = ("state_dict_ema", "model_ema", "ema", "ema_state_dict")
# Bookkeeping buffers that wrappers add and no network has.
_WRAPPER_BUFFERS = {"n_averaged": "AveragedModel's update counter"}


def summarize_checkpoint(checkpoint: Mapping, *, path: str, key: str | None = None) -> CheckpointSummary:
    """Describe a (possibly nested) checkpoint; the main state_dict is picked if none is named."""
    nested = nested_entries(checkpoint)
    if key is None and nested:
        key = _main_entry(nested)
    state = select_state_dict(checkpoint, key=key, source=path)
    tensors = tuple((k, tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in state.items())
    return CheckpointSummary(
        path=path, nested=tuple(nested), selected=key,
        other_entries=tuple(sorted(k for k in checkpoint if k not in nested)) if nested else (),
        tensors=tensors, layers=infer_layers(state),
    )


def _main_entry(nested: list[str]) -> str:
    for name in ("state_dict", "model_state_dict", "model", "module"):
        if name in nested:
            return name
    return next((n for n in nested if n not in _EMA_ENTRIES), nested[0])


def infer_layers(state_dict: Mapping) -> tuple[LayerGuess, ...]:
    """Guess the layer behind each module path from the names and shapes of its tensors."""
    groups: dict[str, dict[str, tuple[int, ...]]] = defaultdict(dict)
    for key, tensor in state_dict.items():
        path, _, leaf = key.rpartition(".")
        groups[path][leaf] = tuple(getattr(tensor, "shape", tensor))
    return _embedding_tables(tuple(_guess(path, leaves) for path, leaves in groups.items()))


def _embedding_tables(layers: tuple[LayerGuess, ...]) -> tuple[LayerGuess, ...]:
    """Weight-only matrices that do not chain into the next matrix are embedding tables, whatever their name.

    ``nn.Embedding(n, d)`` and ``nn.Linear(d, n, bias=False)`` hold the same ``(n, d)`` weight. A
    bias-free Linear feeds the layer after it (its ``n`` outputs are that layer's inputs); a
    categorical table does not: its rows are categories, and its ``d``-wide vectors are
    concatenated into a later layer's input. A weight-only matrix with no matrix after it stays a
    Linear (a final projection).
    """
    matrices = [i for i, l in enumerate(layers) if l.kind in ("Linear", "Embedding")]
    out = list(layers)
    for position, i in enumerate(matrices[:-1]):
        layer, following = layers[i], layers[matrices[position + 1]]
        if layer.kind != "Linear" or layer.bias or len(layer.tensors) != 1:
            continue
        rows = dict(layer.tensors)["weight"][0]
        takes = following.args[1] if following.kind == "Embedding" else following.args[0]
        if rows != takes:
            out[i] = LayerGuess(layer.path, "Embedding", (rows, layer.args[0]), layer.tensors)
    return tuple(out)


def _guess(path: str, leaves: dict[str, tuple[int, ...]]) -> LayerGuess:
    tensors = tuple(leaves.items())
    w, b = leaves.get("weight"), leaves.get("bias")
    names = set(leaves)
    if names >= {"weight", "running_mean", "running_var"} and len(w) == 1:
        return LayerGuess(path, "BatchNorm1d", (w[0],), tensors)
    if names == {"weight", "bias"} and len(w) == 1 == len(b):
        return LayerGuess(path, "LayerNorm", (w[0],), tensors)
    if names == {"weight"} and len(w) == 2 and "emb" in path.lower():
        return LayerGuess(path, "Embedding", (w[0], w[1]), tensors)
    if names <= {"weight", "bias"} and w is not None and len(w) == 2:
        return LayerGuess(path, "Linear", (w[1], w[0]), tensors, bias=b is not None)
    if names <= {"weight", "bias"} and w is not None and len(w) == 4:
        return LayerGuess(path, "Conv2d", (w[1], w[0], w[2], w[3]), tensors, bias=b is not None)
    return LayerGuess(path, "Tensors", (), tensors)


def describe_layers(layers: tuple[LayerGuess, ...]) -> list[str]:
    """What a head's tensors say about its inputs and outputs, in words."""
    tables = [l for l in layers if l.kind == "Embedding"]
    linears = [l for l in layers if l.kind == "Linear"]
    lines = []
    if tables:
        dims = {l.args[1] for l in tables}
        lines.append(
            f"{len(tables)} bias-embedding table(s) for categorical input_biases: "
            + ", ".join(f"{l.path} ({l.args[0]} categories x {l.args[1]})" for l in tables)
        )
        if linears and len(dims) == 1:
            first = linears[0].args[0]
            embedding = first - sum(l.args[1] for l in tables)
            lines.append(
                f"the first Linear ({linears[0].path}) takes {first} = {embedding} (embedding) + "
                f"{len(tables)} x {dims.pop()} (bias embeddings, concatenated)"
            )
    elif linears:
        lines.append(f"input width {linears[0].args[0]} (the embedding the head expects)")
    if linears:
        hidden = [l.args[1] for l in linears[:-1]]
        lines.append(f"hidden widths {hidden}, {linears[-1].args[1]} output(s) from {linears[-1].path}")
    norms = [l for l in layers if l.kind in ("LayerNorm", "BatchNorm1d")]
    if norms:
        lines.append("norm layers: " + ", ".join(f"{l.path} {l.call}" for l in norms))
    return lines


def module_source(layers: tuple[LayerGuess, ...], *, class_name: str = "InferredModule") -> str:
    """Python source of an ``nn.Module`` whose state_dict keys and shapes match ``layers``.

    Only the structure is recoverable: activations, dropout and ``forward`` hold no tensors.
    Gaps in numbered containers are filled with ``nn.Identity()`` placeholders.
    """
    tree: dict = {}
    for layer in layers:
        node = tree
        parts = layer.path.split(".") if layer.path else []
        for part in parts[:-1]:
            if isinstance(node.get(part), LayerGuess):  # a module with tensors of its own and children
                node[part] = {"": node[part]}
            node = node.setdefault(part, {})
        key = parts[-1] if parts else ""
        if key and isinstance(node.get(key), dict):
            node[key][""] = layer
        else:
            node[key] = layer
    mixed = False

    def render(node: dict | LayerGuess, indent: int) -> tuple[str, str]:
        """(code, trailing comment) for one node of the module tree."""
        nonlocal mixed
        pad = " " * indent
        if isinstance(node, LayerGuess):
            if node.kind == "Tensors":
                return "nn.Module()", "could not infer: " + ", ".join(f"{n}{list(s)}" for n, s in node.tensors)
            return f"nn.{node.call}", ""
        own = node.get("")
        children = {k: v for k, v in node.items() if k != ""}
        if isinstance(own, LayerGuess) and own.kind == "Tensors":
            mixed = True
            tensors = ", ".join(f"{n!r}: {list(shape)}" for n, shape in own.tensors)
            lines = "".join(f"\n{pad}    {k}={code}," + (f"  # {comment}" if comment else "")
                            for k, (code, comment) in ((k, render(v, indent + 4)) for k, v in children.items()))
            return f"_WithTensors({{{tensors}}},{lines}\n{pad})", ""
        if all(k.isdigit() for k in children):
            node = children
            top = max(int(k) for k in node)
            items = [render(node[str(i)], indent + 4) if str(i) in node
                     else ("nn.Identity()", "no tensors here: an activation or dropout")
                     for i in range(top + 1)]
            container = "nn.ModuleList([{}\n{}])" if len(node) == top + 1 else "nn.Sequential({}\n{})"
        else:
            items = [(f"{k!r}: {code}", comment) for k, (code, comment) in
                     ((k, render(v, indent + 4)) for k, v in children.items())]
            container = "nn.ModuleDict({{{}\n{}}})"
        lines = "".join(f"\n{pad}    {code}," + (f"  # {comment}" if comment else "") for code, comment in items)
        return container.format(lines, pad), ""

    body = ""
    root = tree.pop("", None)
    for leaf, shape in root.tensors if isinstance(root, LayerGuess) else ():
        body += f"        self.{leaf} = nn.Parameter(torch.zeros({list(shape)}))\n"
    for name, child in tree.items():
        code, comment = render(child, 8)
        body += f"        self.{name} = {code}" + (f"  # {comment}" if comment else "") + "\n"
    helper = (
        "class _WithTensors(nn.Module):\n"
        "    \"\"\"A module holding tensors of its own next to child modules.\"\"\"\n\n"
        "    def __init__(self, tensors, **children):\n"
        "        super().__init__()\n"
        "        for name, shape in tensors.items():\n"
        "            self.register_parameter(name, nn.Parameter(torch.zeros(shape)))\n"
        "        for name, child in children.items():\n"
        "            self.add_module(name, child)\n\n\n"
    ) if mixed else ""
    return (
        "import torch\nfrom torch import nn\n\n\n"
        f"{helper}"
        f"class {class_name}(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        f"{body}"
    )


def _signature(keys: dict[str, tuple[int, ...]], path: str) -> tuple:
    return tuple(sorted((k[len(path) + 1:], s) for k, s in keys.items() if k.rpartition(".")[0] == path))


def _best_prefix(unexpected: set[str], missing: set[str]) -> tuple[str, str] | None:
    votes: Counter = Counter()
    for keys, others, strip in ((unexpected, missing, True), (missing, unexpected, False)):
        for key in keys:
            parts = key.split(".")
            for i in range(1, len(parts)):
                prefix = ".".join(parts[:i]) + "."
                if key[len(prefix):] in others:
                    votes[(prefix, "") if strip else ("", prefix)] += 1
    return votes.most_common(1)[0][0] if votes else None


def _renames(unexpected: dict[str, tuple], missing: dict[str, tuple]) -> list[tuple[str, str]] | None:
    """Module paths that match one-to-one by their tensors' names and shapes, in order."""
    u_paths = list(dict.fromkeys(k.rpartition(".")[0] for k in unexpected))
    m_paths = list(dict.fromkeys(k.rpartition(".")[0] for k in missing))
    by_sig: dict[tuple, list[str]] = defaultdict(list)
    for path in m_paths:
        by_sig[_signature(missing, path)].append(path)
    pairs = []
    for path in u_paths:
        candidates = by_sig.get(_signature(unexpected, path))
        if not candidates:
            return None
        pairs.append((path + ".", candidates.pop(0) + "."))
    return pairs if not any(by_sig.values()) else None


def propose_key_fix(checkpoint: Mapping, module_shapes: Mapping[str, tuple[int, ...]], *,
                    key: str | None, source: str) -> KeyFix:
    """Recognise why ``checkpoint`` does not load into a module with ``module_shapes``, and how to fix it.

    The proposed fix only uses explicit spec fields (``state_dict_key``, ``key_map``,
    ``drop_keys``); it is verified by applying it, and marked ``verified`` when the
    result would load with ``strict=True``.
    """
    causes: list[str] = []
    nested = nested_entries(checkpoint)
    if key is None and nested:
        key = _main_entry(nested)
        extra = [n for n in nested if n != key]
        causes.append(f"the weights are nested under {key!r} in a training checkpoint"
                      + (f" (other entries: {sorted(k for k in checkpoint if k != key)[:8]})" if len(checkpoint) > 1 else ""))
        ema = [n for n in extra if n in _EMA_ENTRIES]
        if ema:
            causes.append(f"{ema[0]!r} holds EMA weights: use state_dict_key = \"{ema[0]}\" instead "
                          "if the model was evaluated with its EMA copy")
    try:
        state = select_state_dict(checkpoint, key=key, source=source)
    except CheckpointError as e:
        return KeyFix(causes=(str(e).splitlines()[0],))
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    drop = tuple(k for k in shapes if k in _WRAPPER_BUFFERS and k not in module_shapes)
    for k in drop:
        causes.append(f"{k!r} is {_WRAPPER_BUFFERS[k]}, not a weight")
        del shapes[k]

    key_map: list[tuple[str, str]] = []
    best = _best_prefix(set(shapes) - set(module_shapes), set(module_shapes) - set(shapes))
    src, dst = best or ("", "")
    if best is not None:
        key_map.append(best)
        causes.append(_prefix_words(src, dst) if not (src == "module." and "n_averaged" in drop) else
                      "saved from torch.optim.swa_utils.AveragedModel (EMA/SWA weights), "
                      "which holds the network as 'module.'")
        shapes = {(dst + k[len(src):] if k.startswith(src) else k): s for k, s in shapes.items()}

    unexpected = {k: s for k, s in shapes.items() if k not in module_shapes}
    missing = {k: s for k, s in module_shapes.items() if k not in shapes}
    if unexpected or missing:
        renames = _renames(unexpected, missing) if unexpected and missing else None
        if renames:
            causes.append("layers were renamed; they match one-to-one by tensor names and shapes: "
                          + ", ".join(f"{a[:-1]} -> {b[:-1]}" for a, b in renames))
            # Express each rename in checkpoint key space; the longer prefix wins over `src`.
            key_map += [(src + a[len(dst):] if a.startswith(dst) else a, b) for a, b in renames]
        else:
            causes.append("the module is a different architecture from the one the weights were trained with")
            if unexpected:
                causes.append("layers in the checkpoint that the module lacks: "
                              + ", ".join(l.path for l in infer_layers(unexpected)))
            if missing:
                causes.append("layers in the module that the checkpoint lacks: "
                              + ", ".join(f"{l.path} {l.call}" for l in infer_layers(missing)))
    fix = KeyFix(causes=tuple(causes), state_dict_key=key if nested else None,
                 key_map=tuple(key_map), drop_keys=drop)
    return KeyFix(**{**fix.__dict__, "verified": _loads(state, module_shapes, fix, source)})


def _prefix_words(src: str, dst: str) -> str:
    if not src:
        return f"the module expects every key under {dst!r}; the checkpoint has them at top level"
    if src in _KNOWN_PREFIXES:
        return _KNOWN_PREFIXES[src]
    parts = [p + "." for p in src[:-1].split(".")]
    known = [_KNOWN_PREFIXES[p].split(" (")[0] for p in parts if p in _KNOWN_PREFIXES]
    return (f"checkpoint keys carry the prefix {src!r} that the module does not have"
            + (f": {' and '.join(known)}" if known else ""))


def _loads(state: Mapping, module_shapes: Mapping[str, tuple[int, ...]], fix: KeyFix, source: str) -> bool:
    try:
        mapped = remap_keys(state, dict(fix.key_map), fix.drop_keys, source=source)
    except CheckpointError:
        return False
    return {k: tuple(v.shape) for k, v in mapped.items()} == dict(module_shapes)


def diagnose_load(checkpoint: Mapping, module, *, section: str, target: str, source: str,
                  state_dict_key: str | None = None, key_map: Mapping[str, str] | None = None,
                  drop_keys=(), convert=None) -> tuple[dict | None, KeyDiff]:
    """Apply the spec's explicit loading fields and compare with ``module``.

    Returns ``(state_dict, diff)`` when it loads with ``strict=True``; otherwise
    ``(None, diff)`` where ``diff`` carries the recognised causes, the proposed spec fix
    (verified by applying it) and, when no fix exists, the checkpoint's inferred architecture.
    """
    try:
        state = select_state_dict(checkpoint, key=state_dict_key, source=source)
        if key_map or drop_keys:
            state = remap_keys(state, key_map or {}, drop_keys, source=source)
        if convert is not None:
            state = convert(state, module)
        diff = dataclasses.replace(diff_state_dict(module, state, target=target, source=source), section=section)
    except CheckpointError:
        if not nested_entries(checkpoint):
            raise
        state, diff = None, KeyDiff(target=target, source=source, missing=tuple(module.state_dict()),
                                    unexpected=tuple(checkpoint), section=section)
    if state is not None and diff.loads:
        return state, diff
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    fix = propose_key_fix(checkpoint, shapes, key=None, source=source)
    if convert is not None and state is not None and not fix.verified:
        # The library's converter already maps its own layout (transformers' `vision_model.` prefix,
        # open_clip's `visual.`): explain what is left after it, not what it handles. A key_map found
        # in converted key space is not a spec fix (the spec's key_map applies before the converter).
        fix = dataclasses.replace(propose_key_fix(state, shapes, key=None, source=source), verified=False)
    inferred = () if fix.verified else summarize_checkpoint(checkpoint, path=source).layers
    return None, dataclasses.replace(diff, fix=fix, inferred=inferred)


def summarize_structure(module) -> dict[str, str]:
    """Module class per path and parameter shape per name, with repeated blocks folded to ``*``.

    ``blocks.0.mlp.act`` .. ``blocks.23.mlp.act`` become one ``blocks.*.mlp.act`` entry when
    every block agrees. This is what a strict load cannot see: QuickGELU vs GELU, ReLU vs
    GELU, a Dropout swapped for an Identity all leave the keys unchanged.
    """
    items = [(name, type(child).__name__) for name, child in module.named_modules() if name]
    items += [(name, str(list(tensor.shape))) for name, tensor in module.state_dict().items()]
    groups: dict[str, dict[str, str]] = {}
    for name, value in items:
        groups.setdefault(_INDEX.sub("*", name), {})[name] = value
    summary: dict[str, str] = {}
    for pattern, members in groups.items():
        values = set(members.values())
        if len(values) == 1:  # fold only where every index agrees, so positions stay visible
            summary[pattern] = values.pop()
        else:
            summary.update(members)
    return summary


def diff_structure(reference: Mapping[str, str], candidate: Mapping[str, str], *, prefix: str = "") -> tuple[ConfigDiff, ...]:
    """Entries whose class or shape differs, or that only one side has (shown as ``<absent>``)."""
    names = list(reference) + [k for k in candidate if k not in reference]
    return tuple(
        ConfigDiff(prefix + name, reference.get(name, ABSENT), candidate.get(name, ABSENT))
        for name in names
        if reference.get(name, ABSENT) != candidate.get(name, ABSENT)
    )
