"""Model loading: timm names, checkpoints, hub weights and bundled models.

A model is always a timm architecture. Its weights come from one of four
places: a ``torch.save`` checkpoint (``checkpoint=``), timm's hub
(``pretrained=True``), a local copy of the hub weights for machines without a
network (``pretrained=<file>``), or a checkpoint bundled inside this package,
named ``<timm name>.<dataset>`` (for example ``mobilevit_xxs.cifar10``).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from ._io import check_input_file, invalid_file, read_torch_file
from .errors import HybridQuantError

#: Keys of timm's pretrained_cfg that describe preprocessing.
DATA_CFG_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")


@dataclass
class LoadedModel:
    """A model in eval mode with everything needed to feed it data."""

    model: nn.Module
    name: str  # the timm architecture name
    data_cfg: dict[str, Any]  # timm pretrained_cfg keys (input_size, mean, std, ...)
    class_names: list[str] | None = None
    source: str = ""  # where the weights came from, for reports
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return classes_of(self.model)


def classes_of(model: nn.Module) -> int:
    """Outputs of a timm classifier (its ``num_classes``; EfficientFormerV2's ``get_classifier()`` is a pair of
    heads whose outputs it averages)."""
    n = getattr(model, "num_classes", None)
    return int(n) if n is not None else int(model.get_classifier().out_features)


def bundled_dir() -> Path:
    """Folder holding the checkpoints shipped with the package."""
    return Path(str(resources.files("hybridquant") / "bundled"))


def list_bundled() -> list[str]:
    """Names of the bundled models, e.g. ``['mobilevit_xxs.cifar10']``."""
    return sorted(p.name[: -len(".pt")] for p in bundled_dir().glob("*.pt"))


def _check_arch(name: str) -> None:
    if timm.is_model(name):
        try:  # timm.is_model ignores a '.tag' suffix; an unknown tag is an unknown model too
            timm.models.get_pretrained_cfg(name)
            return
        except RuntimeError:
            pass
    close = difflib.get_close_matches(name, timm.list_models() + list_bundled(), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise HybridQuantError(f"unknown model '{name}'{hint}")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint into the canonical dict form ``{'state_dict': ..., ...}``.

    Accepts a plain state_dict or a dict with key ``state_dict`` and optional
    keys ``model``, ``num_classes``, ``class_names`` and ``pretrained_cfg``.
    """
    path = Path(path)
    obj = read_torch_file(path, "checkpoint")  # missing, a folder or damaged: a one-line error naming it
    if isinstance(obj, dict) and "state_dict" in obj:
        ckpt = dict(obj)
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        ckpt = {"state_dict": obj}
    else:
        raise HybridQuantError(
            f"checkpoint {path} is neither a state_dict nor a dict with key 'state_dict'"
        )
    if not isinstance(ckpt["state_dict"], dict):
        raise HybridQuantError(f"checkpoint {path}: 'state_dict' is not a dict of tensors")
    # strip 'module.' / '_orig_mod.' here, so the classifier size is read from the real keys
    ckpt["state_dict"] = _strip_prefix(ckpt["state_dict"])
    return ckpt


def _classifier_key(name: str) -> str:
    cfg = timm.models.get_pretrained_cfg(name)
    classifier = (cfg.classifier if cfg is not None else None) or "head.fc"
    if isinstance(classifier, (list, tuple)):
        classifier = classifier[0]
    return f"{classifier}.weight"


def _infer_num_classes(name: str, ckpt: dict[str, Any]) -> int | None:
    if "num_classes" in ckpt:
        return int(ckpt["num_classes"])
    weight = ckpt["state_dict"].get(_classifier_key(name))
    return int(weight.shape[0]) if weight is not None else None


def _merge_data_cfg(model: nn.Module, override: dict[str, Any] | None) -> dict[str, Any]:
    cfg = {k: model.pretrained_cfg[k] for k in DATA_CFG_KEYS if k in model.pretrained_cfg}
    for key, value in (override or {}).items():
        if key in DATA_CFG_KEYS and value is not None:
            cfg[key] = tuple(value) if isinstance(value, list) else value
    return cfg


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The state_dict in a hub weights file, read as timm reads it; a one-line error when it cannot be."""
    check_input_file(path, "weights file")
    safetensors = path.name.endswith(".safetensors")  # timm picks the reader by this suffix
    try:
        return timm.models.load_state_dict(str(path))
    except MemoryError:
        raise
    except Exception as exc:  # safetensors and torch raise many types for a damaged file
        error = invalid_file("weights file", path, "safetensors" if safetensors else "torch.save")
        # the hub cache keeps files under hash names: a renamed safetensors file reads as a broken torch file
        hint = "" if safetensors else " (a safetensors file must be named *.safetensors)"
        raise HybridQuantError(f"{error}{hint}") from exc


def _load_error_detail(exc: Exception) -> str:
    """The informative line of a failed ``load_state_dict`` (its first line only names the model class)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
    return lines[1] if len(lines) > 1 else lines[0]


def _strip_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Checkpoints from DDP or torch.compile prefix every key.
    for prefix in ("module.", "_orig_mod."):
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def _checkpoint_img_size(ckpt: dict[str, Any]) -> int | None:
    size = (ckpt.get("pretrained_cfg") or {}).get("input_size")
    return int(size[-1]) if size else None


def _create(arch: str, pretrained: bool, img_size: int | None, kwargs: dict[str, Any]) -> nn.Module:
    """``timm.create_model``, given ``img_size`` when the architecture takes one."""
    if img_size is not None:
        try:
            return timm.create_model(arch, pretrained=pretrained, img_size=img_size, **kwargs)
        except TypeError as exc:  # the model class has no img_size argument (FastViT, ...)
            if "img_size" not in str(exc):
                raise
    return timm.create_model(arch, pretrained=pretrained, **kwargs)


def load_model(
    name: str,
    checkpoint: str | Path | None = None,
    pretrained: bool | str | Path = False,
    num_classes: int | None = None,
    img_size: int | None = None,
) -> LoadedModel:
    """Build a timm model and load its weights.

    ``name`` is a timm architecture (``mobilevit_xxs``) or a bundled model
    (``mobilevit_xxs.cifar10``). With neither ``checkpoint`` nor ``pretrained``
    and a plain timm name, the weights are randomly initialised (useful for
    tests and for training).

    ``pretrained=True`` downloads timm's hub weights. A path instead names those
    weights downloaded elsewhere (the hub's ``model.safetensors`` or
    ``pytorch_model.bin``); timm loads them as it loads hub weights (the model's
    filter function, classifier adaptation). The classifier gets the file's
    number of classes unless ``num_classes`` asks for another head, which timm
    then initialises randomly.

    ``img_size`` builds the model for that input size, as architectures whose
    parameters depend on it need (EfficientFormerV2 and EfficientViT-M size
    their attention biases by it); a checkpoint's ``pretrained_cfg`` input
    size is the default. Architectures without the argument ignore it.
    """
    weights = Path(pretrained) if isinstance(pretrained, (str, Path)) else None
    if weights is not None and checkpoint is not None:
        raise HybridQuantError("pass either --checkpoint or --weights, not both")
    if name in list_bundled():
        if checkpoint is not None or weights is not None:
            option = "--checkpoint" if checkpoint is not None else "--weights"
            raise HybridQuantError(f"'{name}' is a bundled model; do not pass {option} with it")
        checkpoint = bundled_dir() / f"{name}.pt"
        source = f"bundled:{name}"
    elif weights is not None:
        source = f"weights-file:{weights}"
    else:
        source = str(checkpoint) if checkpoint else ("timm-hub" if pretrained else "random-init")

    ckpt = read_checkpoint(checkpoint) if checkpoint is not None else None
    arch = name
    if ckpt is not None and name in list_bundled():
        arch = str(ckpt.get("model", name.split(".")[0]))
    _check_arch(arch)
    if ckpt is not None and ckpt.get("model") and str(ckpt["model"]) != arch:
        raise HybridQuantError(
            f"checkpoint {checkpoint} was saved for model '{ckpt['model']}', not '{arch}'"
        )

    kwargs: dict[str, Any] = {}
    ckpt_classes = _infer_num_classes(arch, ckpt) if ckpt is not None else None
    if ckpt_classes is not None:
        kwargs["num_classes"] = ckpt_classes
    elif num_classes is not None:
        kwargs["num_classes"] = num_classes
    if weights is not None:
        # timm reads the file again below; reading it first refuses a damaged file with one line
        # and tells the size of its classifier (a hub file fine-tuned to other classes keeps its head)
        head = _read_weights(weights).get(_classifier_key(arch))
        overlay: dict[str, Any] = {"file": str(weights)}
        if head is not None:
            overlay["num_classes"] = int(head.shape[0])
        kwargs["pretrained_cfg_overlay"] = overlay
    if img_size is None and ckpt is not None:
        img_size = _checkpoint_img_size(ckpt)
    try:
        model = _create(arch, bool(pretrained) and ckpt is None, img_size, kwargs)
    except Exception as exc:
        if weights is not None:
            raise HybridQuantError(
                f"weights file {weights} does not fit model '{arch}': {_load_error_detail(exc)}"
            ) from exc
        if pretrained:
            raise HybridQuantError(
                f"cannot fetch pretrained weights for '{arch}' from the timm hub "
                f"({type(exc).__name__}); check the network or pass --checkpoint"
            ) from exc
        raise HybridQuantError(f"cannot build model '{arch}': {exc}") from exc

    if ckpt is not None:
        state_dict = _strip_prefix(ckpt["state_dict"])
        try:
            model.load_state_dict(state_dict, strict=True)
        except RuntimeError as exc:
            raise HybridQuantError(
                f"checkpoint {checkpoint} does not fit model '{arch}': {_load_error_detail(exc)}"
            ) from exc

    model.eval()
    data_cfg = _merge_data_cfg(model, (ckpt or {}).get("pretrained_cfg"))
    class_names = list(ckpt["class_names"]) if ckpt and ckpt.get("class_names") else None
    if class_names is not None and len(class_names) != classes_of(model):
        raise HybridQuantError(
            f"checkpoint {checkpoint} lists {len(class_names)} class names "
            f"for a {classes_of(model)}-way classifier"
        )
    extra = {k: ckpt[k] for k in ("recipe", "metrics") if ckpt and k in ckpt}
    return LoadedModel(model, arch, data_cfg, class_names, source, extra)
