"""resize=true, the preprocessing that turns photos and drawings into what the models were trained on
(serving/resize.py): the dataset's own digits recovered from enlarged scans on any paper, thin strokes
kept, dots and blank images refused, grey and colour photos routed. Units on the preprocessing and
requests in-process (FastAPI's TestClient)."""
import io

import numpy as np
import pytest
from PIL import Image

from bench.harness import png
from serving import images as decoding
from serving import resize
from tests.helpers import offline


def on_paper(digit: np.ndarray, scale: int, top: int, left: int, size=(300, 260), dark_ink=True,
             paper: int | None = None, contrast: int = 200) -> np.ndarray:
    """An 8x8 digit drawn `scale` times larger at (top, left) on a large sheet, as a scan would show it:
    ink `contrast` levels from the paper, darker or brighter."""
    ink = np.kron(digit / 16, np.ones((scale, scale)))
    sheet = np.zeros(size)
    sheet[top:top + ink.shape[0], left:left + ink.shape[1]] = ink
    paper = (235 if dark_ink else 20) if paper is None else paper
    values = paper - contrast * sheet if dark_ink else paper + contrast * sheet
    return np.round(values).astype(np.uint8)


def test_resize_recovers_the_dataset_digit_from_an_enlarged_scan(exports, test_digits):
    """The preprocessing inverts the dataset's own: test digits enlarged and placed anywhere on a
    large sheet classify as the 8x8 originals do (the former whole-image shrink got ~10 % right)."""
    images, _ = test_digits
    rng = np.random.default_rng(0)
    fitted = np.stack([resize.digit_bitmap_counts(
        on_paper(digit, int(rng.integers(12, 25)), int(rng.integers(0, 100)), int(rng.integers(0, 60))), None)
        for digit in images[:100]])
    assert np.abs(fitted - images[:100]).mean() < 2.0  # counts on 0..16
    exact, recovered = (offline(exports, "digits-cnn", x[:, None].astype(np.float32)).argmax(1)
                        for x in (images[:100], fitted))
    assert (exact == recovered).mean() >= 0.95


def test_resize_detects_the_ink_polarity_and_ignores_position_and_scale(test_digits):
    images, _ = test_digits
    reference = resize.digit_bitmap_counts(on_paper(images[5], 20, 10, 10), None)
    moved = resize.digit_bitmap_counts(on_paper(images[5], 20, 130, 90), None)
    assert np.array_equal(moved, reference)
    # counts on 0..16: within 8-bit rounding (polarity), and resampling (a sheet over WORK_SIDE)
    for sheet, tolerance in ((on_paper(images[5], 20, 10, 10, dark_ink=False), 0.25),
                             (on_paper(images[5], 20, 60, 40, size=(500, 700)), 0.5)):
        assert np.abs(resize.digit_bitmap_counts(sheet, None) - reference).max() < tolerance
    told = resize.digit_bitmap_counts(on_paper(images[5], 20, 10, 10), True)
    assert np.array_equal(told, reference)


def test_resize_through_the_api_shows_what_the_model_saw(client, test_digits):
    images, labels = test_digits
    sheet = on_paper(images[30], 18, 40, 50)
    answer = client.post("/predict", params={"resize": "true", "model_input": "true"},
                         files={"file": ("scan.png", png(sheet, "L"))})
    assert answer.status_code == 200
    prediction = answer.json()["predictions"][0]
    assert prediction["model"] == "digits-cnn" and prediction["label"] == labels[30]
    again = client.post("/predict", json={"pixels": [prediction["model_input"]]}).json()["predictions"][0]
    assert again["label"] == prediction["label"]
    assert np.allclose(again["probabilities"], prediction["probabilities"], atol=1e-4)


def test_resize_finds_dark_ink_on_dim_paper(test_digits):
    images, _ = test_digits
    """Paper darker than mid-grey (115 of 255) with black ink used to be read as bright ink: 422."""
    bright = resize.digit_bitmap_counts(on_paper(images[5], 20, 10, 10), None)
    for dim in (on_paper(images[5], 20, 10, 10, paper=115, contrast=110),  # dark ink
                on_paper(images[5], 20, 10, 10, paper=140, contrast=110, dark_ink=False)):  # chalk, brighter
        assert np.abs(resize.digit_bitmap_counts(dim, None) - bright).max() < 0.5


def test_resize_keeps_one_pixel_strokes(client):
    """A 1-px pen on a large canvas (a median filter used to erase it: "no digit found")."""
    sheet = np.full((600, 600), 255, np.uint8)
    sheet[120:480, 300] = 0  # a "1"
    answer = client.post("/predict", params={"resize": "true"}, files={"file": ("one.png", png(sheet, "L"))})
    assert answer.status_code == 200 and answer.json()["predictions"][0]["label"] == 1


@pytest.mark.parametrize("mark", [(slice(98, 101), slice(98, 101)), (slice(90, 108), slice(90, 108))])
def test_resize_of_a_dot_or_a_tap_is_not_a_digit(client, mark):
    """A dot used to be blown up to fill the bitmap and classified at p = 1.0."""
    sheet = np.full((200, 200), 255, np.uint8)
    sheet[mark] = 0
    answer = client.post("/predict", params={"resize": "true"}, files={"file": ("dot.png", png(sheet, "L"))})
    assert answer.status_code == 422 and "crop the photo to the digit" in answer.json()["error"]


def test_resized_grey_rgb_photos_go_to_digits_colour_ones_to_svhn(client, test_digits):
    images, labels = test_digits
    grey = np.repeat(on_paper(images[30], 18, 40, 50)[..., None], 3, axis=2)  # a scan saved as RGB (JPEG, canvas)
    answer = client.post("/predict", params={"resize": "true"}, files={"file": ("scan.png", png(grey, "RGB"))})
    assert answer.json()["predictions"][0]["model"] == "digits-cnn"
    warm = np.clip(grey * np.array([1.0, 0.94, 0.82]), 0, 255).astype(np.uint8)  # a scan under a warm lamp
    answer = client.post("/predict", params={"resize": "true"}, files={"file": ("warm.png", png(warm, "RGB"))})
    assert answer.json()["predictions"][0]["model"] == "digits-cnn"  # was sent to the house-number model
    assert "no colour" in answer.json()["predictions"][0]["routed"]
    photo = grey.copy()
    photo[:, :130, 0], photo[:, 130:, 2] = 255, 255  # half red, half blue: a colour photo
    answer = client.post("/predict", params={"resize": "true"}, files={"file": ("photo.png", png(photo, "RGB"))})
    assert answer.json()["predictions"][0]["model"] == "svhn-tiny"


@pytest.mark.parametrize("pixels", [np.full((120, 90), 200, np.uint8), np.full((120, 90), 200, np.uint8) + 
                                    np.random.default_rng(0).integers(0, 8, (120, 90), dtype=np.uint8)])
def test_resize_of_a_blank_image_says_no_digit_was_found(client, pixels):
    answer = client.post("/predict", params={"resize": "true"}, files={"file": ("blank.png", png(pixels, "L"))})
    assert answer.status_code == 422 and "no digit found" in answer.json()["error"]


def test_resize_of_a_colour_photo_cuts_the_centre_square_for_svhn(client):
    photo = np.zeros((64, 96, 3), np.uint8)
    photo[:, :16] = photo[:, -16:] = (0, 0, 255)  # blue beyond the centre square
    photo[:, 16:-16] = (255, 0, 0)
    answer = client.post("/predict", params={"resize": "true", "model_input": "true"},
                         files={"file": ("p.png", png(photo, "RGB"))})
    prediction = answer.json()["predictions"][0]
    assert prediction["model"] == "svhn-tiny"
    assert np.array_equal(np.unique(np.reshape(prediction["model_input"], (-1, 3)), axis=0), [[255, 0, 0]])


def test_a_phone_sized_jpeg_is_decoded_at_reduced_scale_and_answered(client, test_digits):
    """A 12 MP photo (4000 x 3000) of a digit: decoded by the JPEG's own DCT at a fraction of its
    pixels, never below what resize needs, and answered as the 8x8 digit it shows."""
    digits, labels = test_digits
    sheet = on_paper(digits[30], 300, 600, 1300, size=(3000, 4000))
    photo = io.BytesIO()
    Image.fromarray(sheet).convert("RGB").save(photo, "JPEG", quality=90)
    decoded = decoding.decode(decoding.open_image(photo.getvalue()), resize.WORK_SIDE)
    assert resize.WORK_SIDE <= min(decoded.size) and decoded.size[0] * decoded.size[1] <= 4000 * 3000 / 4
    answer = client.post("/predict", params={"resize": "true"}, files={"file": ("phone.jpg", photo.getvalue())})
    assert answer.status_code == 200, answer.text
    assert answer.json()["predictions"][0]["label"] == labels[30]
