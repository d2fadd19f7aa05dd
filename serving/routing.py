"""Which served model answers an input, and the array that model takes: the one place that decides.

A model is found by what its manifest says it takes (`input`: grey or colour, height x width), never
by the name of its dataset, so a model of a new shape is served with no change here, and takes over
nothing but inputs of its own shape. Among models that take the same input, the default is the one
with the lowest validation NLL at its best epoch (ties: by name); the others answer when named
(`model=`). Each answer says why its model answered (`Routed.reason`). A resize=true upload of
another size goes to a model trained on photos and drawings (`input.resized`) where one takes
that input.

An upload of a served size goes to the model of that size (grey or colour by the image, where both
are served). With resize=true, another size goes to a colour model if the image has colour and one is
served, otherwise to a grey one: a scan or a drawing saved as RGB is grey (images.looks_grey).
"""
from dataclasses import dataclass, field

import numpy as np

from serving import images
from serving.errors import InputError, ModelNotFound, ModelUnavailable
from serving.inference import ServedModel
from serving.resize import WORK_SIDE, fitted_input

GREY, COLOUR = "grayscale", "RGB"
InputKey = tuple[str, int, int]  # (colour, height, width)


def input_key(spec: dict) -> InputKey:
    return (spec["color"], *images.spec_size(spec))


def described(key: InputKey) -> str:
    colour, height, width = key
    return f"{width}x{height} {'grey' if colour == GREY else 'colour'}"


def validation_nll(model: ServedModel) -> float:
    metrics = model.manifest["metrics"]
    return metrics["val_nll"][metrics["best_epoch"]]


@dataclass(frozen=True)
class Catalog:
    """The model versions this process serves at one moment, and which of them answers each input."""
    served: dict[str, ServedModel] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)   # name -> why it is not served
    defaults: dict[InputKey, str] = field(default_factory=dict)  # input -> the model answering it unless one is named

    resized: dict[InputKey, str] = field(default_factory=dict)   # input -> the model answering resize=true uploads

    @classmethod
    def of(cls, served: dict[str, ServedModel], unavailable: dict[str, str]) -> "Catalog":
        defaults, resized = {}, {}
        for name in sorted(served, key=lambda n: (validation_nll(served[n]), n)):
            key = input_key(served[name].manifest["input"])
            defaults.setdefault(key, name)
            if served[name].manifest["input"].get("resized"):
                resized.setdefault(key, name)
        return cls(dict(sorted(served.items())), dict(sorted(unavailable.items())), dict(sorted(defaults.items())),
                   {key: resized.get(key, name) for key, name in sorted(defaults.items())})

    @property
    def names(self) -> list[str]:
        return sorted({*self.served, *self.unavailable})

    def model(self, name: str) -> ServedModel:
        """The served version of `name`; 404 naming the known models, or 503 saying why it is unavailable."""
        if name in self.served:
            return self.served[name]
        if name in self.unavailable:
            raise ModelUnavailable(f"model {name!r} is unavailable: {self.unavailable[name]}")
        raise ModelNotFound(f"unknown model {name[:100]!r}; known: {', '.join(self.names)}")

    def default_for(self, name: str) -> InputKey | None:
        """The input `name` answers by default, if any."""
        return next((key for key, default in self.defaults.items() if default == name), None)

    def answers(self, name: str) -> list[str]:
        """What `name` answers unless a request names another model, and why (for /models and the page)."""
        said = []
        for key, default in self.defaults.items():
            if default == name:
                rivals = sum(input_key(m.manifest["input"]) == key for m in self.served.values()) - 1
                said.append(f"{described(key)} images: " + ("the lowest validation NLL of the "
                            f"{rivals + 1} models that take them" if rivals else "the only model that takes them"))
        for colour, kind in ((GREY, "without colour (photos, scans, drawings)"), (COLOUR, "with colour")):
            model = default_of_colour(self, colour)
            if model is not None and model.name == name:
                said.append(f"resize=true uploads {kind}{for_photos(model)}")
        return said

    def accepted(self) -> str:
        return " or ".join(described(key) for key in self.defaults) or "none (no model is served)"


@dataclass(frozen=True)
class Routed:
    model: ServedModel
    array: np.ndarray  # what the model takes: C x H x W in its dtype and range
    reason: str        # why this model answered, for the client


def route_image(catalog: Catalog, image, model: str | None, invert: bool | None, resize: bool) -> Routed:
    """An opened upload (its header read, nothing decoded yet) -> its model and array. A size no model
    takes is refused before the image is decoded."""
    width, height = image.size
    if model is not None:
        served, reason = catalog.model(model), "named in the request"
        if (height, width) != images.spec_size(served.manifest["input"]) and not resize:
            raise InputError(f"image is {width}x{height}; model {model!r} takes "
                             f"{described(input_key(served.manifest['input']))} images (or pass resize=true)", 422)
    else:
        served, reason = by_header(catalog, image, resize)
    exact = (height, width) == images.spec_size(served.manifest["input"])
    decoded = images.decode(image, None if exact else WORK_SIDE)  # a phone's JPEG decoded at 1/2..1/8 scale
    if model is None and resize and served.manifest["input"]["color"] == COLOUR and images.looks_grey(decoded):
        grey = default_of_colour(catalog, GREY)
        if grey is not None and not exact:
            served, reason = grey, f"resize=true: the image has no colour, and a grey model is served{for_photos(grey)}"
    spec = served.manifest["input"]
    pixels = images.to_gray_or_rgb(decoded, spec["color"])
    if pixels.shape[:2] == images.spec_size(spec):
        return Routed(served, images.model_input(pixels, spec, bool(invert)), reason)
    return Routed(served, fitted_input(pixels, spec, invert), reason)


def by_header(catalog: Catalog, image, resize: bool) -> tuple[ServedModel, str]:
    width, height = image.size
    grey = image.mode in images.GREY_MODES
    exact = [key for key in catalog.defaults if key[1:] == (height, width)]
    if exact:
        key = next((k for k in exact if (k[0] == GREY) == grey), exact[0])
        return catalog.served[catalog.defaults[key]], f"the default model for {described(key)} images"
    if resize and catalog.defaults:
        if not grey and (colour := default_of_colour(catalog, COLOUR)) is not None:
            return colour, f"resize=true: the image has colour, and a colour model is served{for_photos(colour)}"
        served = default_of_colour(catalog, GREY) or default_of_colour(catalog, COLOUR)
        kind = described(input_key(served.manifest["input"]))
        if served.manifest["input"].get("resized"):  # not the default of its size: say why it answers
            return served, f"resize=true: the model for {kind} images trained on photos and drawings"
        return served, f"resize=true: the default model for {kind} images"
    raise InputError(f"image is {width}x{height}; the served models take {catalog.accepted()} images (or pass "
                     "resize=true)", 422)


def default_of_colour(catalog: Catalog, colour: str) -> ServedModel | None:
    """The model answering resize=true uploads for the largest input of that colour, if one is served:
    one trained on photos and drawings where there is one (`input.resized` in its manifest)."""
    keys = sorted((key for key in catalog.resized if key[0] == colour), key=lambda k: (-k[1] * k[2], k))
    return catalog.served[catalog.resized[keys[0]]] if keys else None


def for_photos(served: ServedModel) -> str:
    return ", a model trained on photos and drawings" if served.manifest["input"].get("resized") else ""


def route_pixels(catalog: Catalog, value: object, model: str | None, invert: bool | None) -> Routed:
    """A raw pixel array from JSON (H x W grey, H x W x C colour, in the model's range) -> its model and array."""
    array = images.numbers(value, "pixels[] entries must be rectangular arrays of numbers")
    if model is not None:
        served, reason = catalog.model(model), "named in the request"
        if array.shape != pixels_shape(served.manifest["input"]):
            raise InputError(f"pixels[] entry has shape {shape_text(array.shape)}; model {model!r} takes "
                             f"{shape_text(pixels_shape(served.manifest['input']))}", 422)
    else:
        key = next((k for k in catalog.defaults
                    if pixels_shape(catalog.served[catalog.defaults[k]].manifest["input"]) == array.shape), None)
        if key is None:
            accepted = " or ".join(shape_text(pixels_shape(catalog.served[n].manifest["input"]))
                                   for n in catalog.defaults.values())
            raise InputError(f"pixels[] entry has shape {shape_text(array.shape)}; accepted: {accepted}", 422)
        served, reason = catalog.served[catalog.defaults[key]], f"the default model for {described(key)} arrays"
    return Routed(served, images.pixels_input(array, served.manifest["input"], bool(invert)), reason)


def pixels_shape(spec: dict) -> tuple[int, ...]:
    channels, height, width = spec["shape"][1:]
    return (height, width) if channels == 1 else (height, width, channels)


def shape_text(shape: tuple) -> str:
    return "x".join(map(str, shape)) or "scalar"
