"""Request bodies parsed alone (serving/api/bodies.py): multipart's limits and malformed bodies."""
import pytest

from serving.api.bodies import MAX_FIELDS, parse_multipart
from serving.errors import InputError
from serving.service import MAX_IMAGES_PER_REQUEST

TYPE = "multipart/form-data; boundary=XB"


def part(name: str, content: bytes, filename: str | None = None) -> bytes:
    names = f'name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
    return f"--XB\r\nContent-Disposition: form-data; {names}\r\n\r\n".encode() + content + b"\r\n"


def body(*parts: bytes) -> bytes:
    return b"".join(parts) + b"--XB--\r\n"


def test_files_and_fields_in_order():
    inputs, options = parse_multipart(TYPE, body(part("file", b"A", "a.png"), part("model", b"digits-cnn"),
                                                 part("file", b"B", "")))
    assert inputs == [("a.png", "bytes", b"A"), ("file", "bytes", b"B")]  # no file name: the field's
    assert options == {"model": "digits-cnn"}


@pytest.mark.parametrize("raw, message", [
    (body(part("file", b"A", "a.png"))[:-10], "ends before its closing boundary"),  # cut off: not an image
    (b"--XB\r\nContent-Type: text/plain\r\n\r\nA\r\n--XB--\r\n", "Content-Disposition"),
    (body(*[part("file", b"A", f"{i}.png") for i in range(MAX_IMAGES_PER_REQUEST + 1)]), "more than"),
    (body(*[part(f"f{i}", b"1") for i in range(MAX_FIELDS + 1)]), "more than"),
    (body(*[part("file", b"A", "a.png")] * (MAX_IMAGES_PER_REQUEST + MAX_FIELDS + 1)), "more than"),
])
def test_malformed_or_oversized_bodies_are_400_saying_why(raw, message):
    with pytest.raises(InputError, match=message) as refused:
        parse_multipart(TYPE, raw)
    assert refused.value.status == 400 and refused.value.message.startswith("malformed multipart body")


def test_no_boundary_and_an_option_sent_as_a_file():
    with pytest.raises(InputError, match="names no boundary"):
        parse_multipart("multipart/form-data", body(part("file", b"A", "a.png")))
    with pytest.raises(InputError, match="must be a value, not a file") as refused:
        parse_multipart(TYPE, body(part("model", b"x", "model.txt")))
    assert refused.value.status == 422
