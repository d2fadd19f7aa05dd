"""serving/routing.py, the one place that decides which served model answers an input: Catalog.of
picks the default for each input (grey or colour, height x width) by the lowest validation NLL at
the best epoch, then by name; route_image and route_pixels send an input to it (or to the model
named), give the array that model takes, and refuse what no model takes with errors that name the
sizes. Unit tests on stub models (manifests without artifacts), no server."""
import numpy as np
import pytest

from bench.harness import png
from serving import images
from serving.errors import InputError, ModelNotFound, ModelUnavailable
from serving.routing import Catalog, route_image, route_pixels
from tests.helpers import DIGITS_SPEC, stub_catalog, stub_model

SVHN_SPEC = {"shape": [None, 3, 32, 32], "dtype": "uint8", "range": [0, 255], "color": "RGB"}
GREY_8, COLOUR_32 = ("grayscale", 8, 8), ("RGB", 32, 32)


@pytest.fixture
def catalog() -> Catalog:
    """Three 8x8 grey models (b and c tie on validation NLL) and one 32x32 colour model."""
    return stub_catalog(stub_model("a", DIGITS_SPEC, val_nll=0.2), stub_model("c", DIGITS_SPEC, val_nll=0.1),
                        stub_model("b", DIGITS_SPEC, val_nll=0.1), stub_model("svhn", SVHN_SPEC, val_nll=0.9))


def test_the_default_for_each_input_is_the_lowest_validation_nll_then_the_name(catalog):
    assert catalog.defaults == {COLOUR_32: "svhn", GREY_8: "b"}
    assert catalog.default_for("b") == GREY_8 and catalog.default_for("svhn") == COLOUR_32
    assert catalog.default_for("a") is None and catalog.default_for("c") is None
    assert catalog.names == ["a", "b", "c", "svhn"]


def test_the_validation_nll_is_the_one_at_the_best_epoch():
    early = stub_model("early", DIGITS_SPEC)
    early.manifest["metrics"] = {"best_epoch": 1, "val_nll": [0.9, 0.05, 0.3]}  # its best: 0.05 (epoch 1)
    late = stub_model("late", DIGITS_SPEC)
    late.manifest["metrics"] = {"best_epoch": 0, "val_nll": [0.1, 0.01]}  # its best: 0.1 (epoch 0)
    assert stub_catalog(late, early).defaults == {GREY_8: "early"}


def test_a_model_of_another_shape_takes_over_nothing_but_its_own_input():
    catalog = stub_catalog(stub_model("digits", DIGITS_SPEC, val_nll=0.5),
                           stub_model("digits-16", {**DIGITS_SPEC, "shape": [None, 1, 16, 16]}, val_nll=0.0001))
    assert catalog.defaults == {GREY_8: "digits", ("grayscale", 16, 16): "digits-16"}
    assert catalog.accepted() == "8x8 grey or 16x16 grey"


def test_unknown_and_unavailable_models_are_404_and_503_with_their_reason():
    catalog = Catalog.of({"b": stub_model("b", DIGITS_SPEC)}, {"broken": "model.onnx does not match its sha256"})
    assert catalog.names == ["b", "broken"] and catalog.model("b").name == "b"
    with pytest.raises(ModelUnavailable, match="model 'broken' is unavailable: model.onnx does not match") as caught:
        catalog.model("broken")
    assert caught.value.status == 503
    with pytest.raises(ModelNotFound, match="unknown model 'nope'; known: b, broken") as caught:
        catalog.model("nope")
    assert caught.value.status == 404
    assert Catalog.of({}, {}).accepted() == "none (no model is served)"


def upload(array: np.ndarray, mode: str):
    """An upload as the route has it: opened, only its header read."""
    return images.open_image(png(array, mode))


def test_an_image_of_a_served_size_goes_to_that_sizes_default(catalog):
    routed = route_image(catalog, upload(np.full((8, 8), 255, np.uint8), "L"), None, invert=False, resize=False)
    assert routed.model.name == "b" and routed.reason == "the default model for 8x8 grey images"
    assert routed.array.shape == (1, 8, 8) and routed.array.dtype == np.float32 and routed.array.max() == 16
    crop = np.zeros((32, 32, 3), np.uint8)
    routed = route_image(catalog, upload(crop, "RGB"), None, invert=True, resize=False)
    assert routed.model.name == "svhn" and routed.array.shape == (3, 32, 32) and routed.array.dtype == np.uint8
    assert (routed.array == 255).all()  # inverted


def test_a_named_model_answers_an_image_of_its_size(catalog):
    routed = route_image(catalog, upload(np.zeros((8, 8), np.uint8), "L"), "a", invert=False, resize=False)
    assert routed.model.name == "a" and routed.reason == "named in the request"


@pytest.mark.parametrize("model, message", [
    (None, "image is 20x12; the served models take 32x32 colour or 8x8 grey images (or pass resize=true)"),
    ("b", "image is 20x12; model 'b' takes 8x8 grey images (or pass resize=true)"),
])
def test_an_image_no_model_takes_is_422_naming_the_sizes(catalog, model, message):
    with pytest.raises(InputError) as caught:
        route_image(catalog, upload(np.zeros((12, 20), np.uint8), "L"), model, invert=False, resize=False)
    assert caught.value.status == 422 and caught.value.message == message


def test_resize_sends_grey_images_to_the_grey_default_and_colour_ones_to_the_colour_default(catalog):
    sheet = np.full((120, 90), 255, np.uint8)
    sheet[20:100, 44:47] = 0  # a "1"
    routed = route_image(catalog, upload(sheet, "L"), None, invert=None, resize=True)
    assert routed.model.name == "b" and routed.reason == "resize=true: the default model for 8x8 grey images"
    assert routed.array.shape == (1, 8, 8)
    photo = np.zeros((60, 40, 3), np.uint8)
    photo[:, :20, 0], photo[:, 20:, 2] = 255, 255  # half red, half blue
    routed = route_image(catalog, upload(photo, "RGB"), None, invert=None, resize=True)
    assert routed.model.name == "svhn"
    assert routed.reason == "resize=true: the image has colour, and a colour model is served"
    assert routed.array.shape == (3, 32, 32)


def test_resize_prefers_a_model_trained_on_photos_and_plain_uploads_keep_the_default():
    photos = stub_model("photos", {**DIGITS_SPEC, "resized": True}, val_nll=0.3)
    catalog = stub_catalog(stub_model("plain", DIGITS_SPEC, val_nll=0.1), photos)
    sheet = np.full((120, 90), 255, np.uint8)
    sheet[20:100, 44:47] = 0
    routed = route_image(catalog, upload(sheet, "L"), None, invert=None, resize=True)
    # it is not the default model of its size, and the reason does not call it one
    assert routed.model.name == "photos"
    assert routed.reason == "resize=true: the model for 8x8 grey images trained on photos and drawings"
    bitmap = np.zeros((8, 8), np.uint8)
    assert route_image(catalog, upload(bitmap, "L"), None, invert=None, resize=False).model.name == "plain"
    assert route_image(catalog, upload(sheet, "L"), "plain", invert=None, resize=True).model.name == "plain"
    assert catalog.answers("plain") == ["8x8 grey images: the lowest validation NLL of the 2 models that take them"]
    assert catalog.answers("photos") == ["resize=true uploads without colour (photos, scans, drawings), a model "
                                         "trained on photos and drawings"]


def test_pixels_go_to_the_default_for_their_shape(catalog):
    routed = route_pixels(catalog, np.full((8, 8), 16).tolist(), None, invert=True)
    assert routed.model.name == "b" and routed.reason == "the default model for 8x8 grey arrays"
    assert routed.array.shape == (1, 8, 8) and (routed.array == 0).all()
    routed = route_pixels(catalog, np.zeros((32, 32, 3), np.uint8).tolist(), None, invert=False)
    assert routed.model.name == "svhn" and routed.array.shape == (3, 32, 32)
    assert route_pixels(catalog, np.zeros((8, 8)).tolist(), "c", invert=False).model.name == "c"


@pytest.mark.parametrize("value, model, message", [
    (np.zeros((5, 5)).tolist(), None, "pixels[] entry has shape 5x5; accepted: 32x32x3 or 8x8"),
    (np.zeros((8, 8)).tolist(), "svhn", "pixels[] entry has shape 8x8; model 'svhn' takes 32x32x3"),
    (3, None, "pixels[] entry has shape scalar; accepted: 32x32x3 or 8x8"),
])
def test_pixels_no_model_takes_are_422_naming_the_shapes(catalog, value, model, message):
    with pytest.raises(InputError) as caught:
        route_pixels(catalog, value, model, invert=False)
    assert caught.value.status == 422 and caught.value.message == message


def test_pixels_for_an_unknown_model_are_404(catalog):
    with pytest.raises(ModelNotFound):
        route_pixels(catalog, np.zeros((8, 8)).tolist(), "nope", invert=False)
