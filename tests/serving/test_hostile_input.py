"""Hostile input never gets a 5xx: the reproducers an adversary found, and property-based tests
(hypothesis) of the decoder, the parsers and the routes that must hold for any input. The routes
in-process (FastAPI's TestClient) on the committed models; the decoder and parsers as units."""
import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from bench.harness import ROOT, png, png_chunk, saved
from serving import images, routing
from serving.api import v2
from serving.errors import InputError
from serving.schemas import V2Tensor
from tests.helpers import DIGITS_SPEC, in_process, stub_catalog, stub_model

CLIENT_STATUSES = {200, 400, 404, 413, 415, 422}


@pytest.fixture(scope="module")
def client():
    with in_process(ROOT / "exports") as c:
        yield c


def webp_vp8x(width: int, height: int) -> bytes:
    header = b"\x00\x00\x00\x00" + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    return b"RIFF" + struct.pack("<I", 4 + 8 + len(header)) + b"WEBPVP8X" + struct.pack("<I", len(header)) + header


def bmp_zero_bits() -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, 8, 8, 1, 0, 0, 16, 0, 0, 0, 0)
    return b"BM" + struct.pack("<IHHI", 70, 0, 0, 54) + info + b"\0" * 16


# Each got a 500 ("Internal Server Error" and a traceback) before 2026-11-28.
@pytest.mark.parametrize("data, status, message", [
    (b"\xff\xd8\xff\xe0\x00\x10", 400, "corrupt image header"),                      # a JPEG header alone
    (b"RIFF\x16\x00\x00\x00WEBPVP8 \x0a\x00\x00\x00", 400, "corrupt image header"),  # a truncated WebP
    (bmp_zero_bits(), 400, "corrupt image header"),                                  # BMP, 0 bits per pixel
    (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", b"\0\0\0\x08\0\0"), 400, "corrupt image header"),  # short IHDR
    (webp_vp8x(9999, 9999), 413, "too many pixels"),                                 # a canvas over 4096^2
    (saved(Image.new("LAB", (8, 8)), "TIFF"), 400, "not an image"),                  # formats not documented:
    (saved(Image.new("RGB", (16, 16)), "ICO"), 400, "not an image"),
    (saved(Image.new("L", (8, 8)), "PPM"), 400, "not an image"),
    (saved(Image.new("L", (8, 8)), "TGA"), 400, "not an image"),
    (saved(Image.new("L", (8, 8)), "PCX"), 400, "not an image"),
])
def test_hostile_uploads_are_client_errors(client, data, status, message):
    response = client.post("/predict", files={"file": ("x", data)})
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


@pytest.mark.parametrize("size", [(8192, 8), (8, 4096), (1, 1), (4096, 1)])
def test_resize_of_extreme_shapes_is_an_answer_or_no_digit(client, size):
    """resize=true shrank an 8192 x 8 image to 512 x 0 and answered 500 (found by hypothesis)."""
    stripes = (np.indices(size[::-1]).sum(axis=0) % 7 == 0).astype(np.uint8) * 255
    for pixels in (stripes, np.zeros_like(stripes)):
        response = client.post("/predict", params={"resize": "true"},
                               files={"file": ("x.png", saved(Image.fromarray(pixels, "L"), "PNG"))})
        assert response.status_code in (200, 422), response.text
        if response.status_code == 422:
            assert "no digit found" in response.json()["error"]


def test_numbers_beyond_float_range_are_client_errors(client):
    huge = "1" + "0" * 400  # valid JSON; float64 cannot hold it
    body = '{"pixels": [[' + ",".join(["[" + ",".join([huge] * 8) + "]"] * 8) + "]]}"
    response = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422 and "numbers" in response.json()["error"]
    tensor = '{"inputs": [{"name": "pixels", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [' + \
             ",".join([huge] * 64) + "]}]}"
    response = client.post("/v2/models/digits-cnn/infer", content=tensor, headers={"content-type": "application/json"})
    assert response.status_code == 400 and "numbers" in response.json()["error"]


def test_pixels_of_all_uploads_together_are_capped_before_decoding(client):
    blank = saved(Image.new("I;16", (4096, 2048)), "PNG")  # a few KB each, 8M pixels each
    files = [("file", (f"{i}.png", blank)) for i in range(3)]
    response = client.post("/predict", params={"resize": "true"}, files=files)
    assert response.status_code == 413 and "in all" in response.json()["error"]


# --- properties: whatever the input, a client error or an answer, never anything else ---

VALID_PNG = png(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4, "L")
VALID_FILES = [VALID_PNG, saved(Image.new("RGB", (32, 32), (200, 10, 10)), "JPEG"),
               saved(Image.new("L", (8, 8), 99), "GIF"), saved(Image.new("L", (8, 8), 99), "WEBP"),
               saved(Image.new("L", (8, 8), 99), "BMP")]


@st.composite
def mutated_files(draw):
    """A valid upload of each accepted format with bytes flipped, cut or inserted."""
    data = bytearray(draw(st.sampled_from(VALID_FILES)))
    for _ in range(draw(st.integers(1, 8))):
        position = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip":
            data[position] ^= draw(st.integers(1, 255))
        elif action == "cut":
            del data[position:]
            if not data:
                break
        else:
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


@settings(max_examples=300, deadline=None)
@given(data=st.one_of(st.binary(max_size=512), mutated_files()))
def test_decoding_any_bytes_is_an_image_or_an_input_error(data):
    try:
        image = images.open_image(data)
        pixels = images.to_gray_or_rgb(images.decode(image), "grayscale")
    except InputError as err:
        assert err.status in (400, 413) and "\n" not in err.message
    else:
        assert pixels.dtype == np.uint8 and pixels.ndim == 2


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=9), max_leaves=80)


@settings(max_examples=300, deadline=None)
@given(value=JSON_VALUES)
def test_any_json_value_as_pixels_is_an_array_or_an_input_error(value):
    catalog = stub_catalog(stub_model("digits", DIGITS_SPEC))
    try:
        routed = routing.route_pixels(catalog, value, None, invert=False)
    except InputError as err:
        assert err.status == 422
    else:
        assert routed.model.name == "digits" and routed.array.shape == (1, 8, 8) and np.isfinite(routed.array).all()


@settings(max_examples=200, deadline=None)
@given(shape=st.lists(st.integers(-2, 40), max_size=5), datatype=st.sampled_from(["FP32", "UINT8", "FP64", "x"]),
       data=st.lists(st.one_of(st.integers(), st.floats(), st.text(max_size=2)), max_size=80))
def test_any_v2_tensor_is_an_array_or_an_input_error(shape, datatype, data):
    spec = {"shape": [None, 1, 8, 8], "dtype": "float32", "range": [0, 16]}
    try:
        array = v2.tensor_array(V2Tensor(name="pixels", shape=shape, datatype=datatype, data=data), spec)
    except InputError as err:
        assert err.status == 400
    else:
        assert array.shape[1:] == (1, 8, 8) and array.dtype == np.float32


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.one_of(st.binary(max_size=256), JSON_VALUES.map(lambda v: json.dumps({"pixels": [v]}).encode()),
                      st.fixed_dictionaries({"images": st.lists(st.text(max_size=12), max_size=3)}).map(
                          lambda v: json.dumps(v).encode())),
       content_type=st.sampled_from(["application/json", "multipart/form-data; boundary=x", "text/plain", ""]))
def test_any_body_on_predict_gets_an_answer_or_a_client_error(client, body, content_type):
    response = client.post("/predict", content=body, headers={"content-type": content_type} if content_type else {})
    assert response.status_code in CLIENT_STATUSES, response.text
    if response.status_code != 200:
        assert set(response.json()) == {"error"}


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=mutated_files(), options=st.fixed_dictionaries(
    {}, optional={"resize": st.sampled_from(["true", "false", "maybe"]), "invert": st.sampled_from(["1", "no"]),
                  "model": st.sampled_from(["digits-cnn", "digits-mlp", "nope"])}))
def test_any_mutated_upload_gets_an_answer_or_a_client_error(client, data, options):
    response = client.post("/predict", params=options, files={"file": ("x", data)})
    assert response.status_code in CLIENT_STATUSES, response.text
