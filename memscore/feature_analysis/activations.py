"""A model's named layers, and one value per channel per image read from them by forward hooks.

``--layers`` names modules as ``model.named_modules()`` does (ResMem: its AlexNet-style branch
``conv1``..``conv5``, its ResNet-152 ``features.layer4.2`` and so on). A channel's activation
for an image is the module's output averaged over positions (``reduce="mean"``, as Olah et
al.'s channel objective) or its maximum (``reduce="max"``). Hooks cost one reduction per layer
on the forward the model runs anyway: the score and the activations come from one pass.

A model that scores several views of an image in one batch (MemNet's ten crops, image-major:
rows ``10n..10n+9`` are image ``n``'s) has each layer's output averaged over its views, as its
score is.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["REDUCTIONS", "LayerInfo", "LayerActivations", "list_layers", "check_layers"]

REDUCTIONS = ("mean", "max")


@dataclass(frozen=True)
class LayerInfo:
    """A module of a model: its name, its type, and its output's channels and spatial size for
    one image at the model's input size (None where it gives no (N, C, ...) tensor; the first
    output's where the forward pass runs it more than once)."""

    name: str
    kind: str
    channels: int | None
    size: tuple[int, ...] | None
    #: times the forward pass runs the module: a module run at several places (MemNet's one
    #: ``pool`` and ``norm`` after conv1 and conv2) has no single output, so is not a layer
    calls: int = 1


def _reduce(output, how: str, views: int):
    """(N*views, C, ...) -> (N, C) float32: over positions, then over an image's views."""
    import torch

    if not isinstance(output, torch.Tensor) or output.dim() < 2:
        raise TypeError("a layer must output an (N, C, ...) tensor")
    x = output.float()
    if x.dim() > 2:
        flat = x.flatten(2)
        x = flat.mean(dim=2) if how == "mean" else flat.amax(dim=2)
    if views > 1:
        x = x.reshape(-1, views, x.shape[1]).mean(dim=1)
    return x


class LayerActivations:
    """Forward hooks on ``layers`` of ``model``: after ``model(batch)``, ``take()`` gives each
    layer's (N, C) activations as float32 tensors and forgets them.

    Args:
        model: a torch module in eval mode.
        layers: module names, as ``model.named_modules()`` gives them.
        reduce: "mean" or "max" over positions.
        views: rows of the model's internal batch per input image (10 for MemNet's ten crops).
    """

    def __init__(self, model, layers, reduce: str = "mean", views: int = 1) -> None:
        if reduce not in REDUCTIONS:
            raise ValueError(f"reduce must be one of {', '.join(REDUCTIONS)}, not {reduce!r}")
        modules = dict(model.named_modules())
        self.layers = tuple(layers)
        self._outputs: dict[str, object] = {}
        self._handles = []
        for name in self.layers:
            module = modules[name]  # check_layers has named any unknown one

            def hook(_module, _inputs, output, name=name):
                self._outputs[name] = _reduce(output, reduce, views)

            self._handles.append(module.register_forward_hook(hook))

    def take(self) -> dict[str, object]:
        missing = [name for name in self.layers if name not in self._outputs]
        if missing:
            raise RuntimeError(f"the forward pass did not run {', '.join(missing)}")
        outputs, self._outputs = self._outputs, {}
        return outputs

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def list_layers(model, input_shape: tuple[int, int, int]) -> list[LayerInfo]:
    """Every named module of ``model`` (the root excepted), with its output's channels and size
    for one zero image of ``input_shape`` (C, H, W), found by a forward pass with hooks."""
    import torch

    shapes: dict[str, tuple[int, ...]] = {}
    calls: dict[str, int] = {}
    handles = []
    named = [(name, module) for name, module in model.named_modules() if name]
    for name, module in named:

        def hook(_module, _inputs, output, name=name):
            calls[name] = calls.get(name, 0) + 1
            if isinstance(output, torch.Tensor):
                shapes.setdefault(name, tuple(output.shape))

        handles.append(module.register_forward_hook(hook))
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    try:
        with torch.inference_mode():  # on the meta device: shapes only, no arithmetic
            model(torch.zeros((1, *input_shape), device=device))
    finally:
        for handle in handles:
            handle.remove()
    layers = []
    for name, module in named:
        shape = shapes.get(name)
        channels = shape[1] if shape is not None and len(shape) >= 2 else None
        size = tuple(shape[2:]) if shape is not None and len(shape) > 2 else None
        layers.append(LayerInfo(name, type(module).__name__, channels, size, calls.get(name, 0)))
    return layers


def check_layers(layers, known: list[LayerInfo], model_name: str) -> None:
    """One line naming the first layer ``model_name`` lacks, or one without channels."""
    by_name = {info.name: info for info in known}
    for name in layers:
        info = by_name.get(name)
        if info is None:
            close = [n for n in by_name if n.endswith(name) or name in n][:5]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(
                f"--layers {name}: {model_name} has no module of that name{hint}; "
                f"`memscore features --model {model_name} --list-layers` lists them"
            )
        if info.calls > 1:
            raise ValueError(
                f"--layers {name}: {model_name}'s forward pass runs this module {info.calls} "
                f"times, so it has no one output; name a module it runs once"
            )
        if info.channels is None:
            raise ValueError(
                f"--layers {name}: its output is not an (N, C, ...) tensor, so it has no channels"
            )
