"""Request bodies parsed alone (serving/api/bodies.py): multipart's limits and malformed bodies."""
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from serving.api.bodies import MAX_FIELDS, framed_parts, parse_multipart, streamed_parts
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


# Mostly well-formed header lines (the fast split's case), sometimes not (the parser's), up to the parser's
# limits and past them (8 lines a part, 4,224 bytes a line, a 256-byte boundary).
NAMES = [b"Content-Disposition", b"content-type", b"X-Y"]
PLAIN_VALUES = (st.sampled_from([b' form-data; name="file"; filename="a.png"', b'form-data; name="model"',
                                 b" image/png", b"  \t v ", b""])
                | st.binary(max_size=12).filter(lambda v: b"\r" not in v and b"\n" not in v))
HEADER_LINES = (st.lists(st.tuples(st.sampled_from(NAMES), PLAIN_VALUES), min_size=1, max_size=2)
                | st.lists(st.tuples(st.sampled_from(NAMES + [b"Bad Name", b"", b"A:B", b"\xff", b" folded"]),
                                     PLAIN_VALUES | st.sampled_from([b"v" * 1100, b"v" * 4300])), max_size=10))
BOUNDARIES = st.sampled_from([b"XB"] * 24 + [b"-", b"--", b"a-b", b"(.*)+?", b"x" * 70, b"x" * 71, b"x" * 256,
                                            b"x" * 257])
CONTENT = (st.binary(max_size=24)
           | st.sampled_from([b"\r\n--XB", b"x\r\n--XB\r\ny", b"\r\n--XB--", b"--XB", b"\r\n", b"\r\n\r\n"]))


@settings(max_examples=600, deadline=None)
@given(boundary=BOUNDARIES, parts=st.lists(st.tuples(HEADER_LINES, CONTENT), max_size=4),
       before=st.sampled_from([b""] * 16 + [b"pre\r\n", b"\r\n"]),
       padding=st.sampled_from([b""] * 16 + [b" ", b"\t", b" \t"]), newline=st.sampled_from([b"\r\n"] * 16 + [b"\n"]),
       after=st.sampled_from([b"\r\n"] * 4 + [b""] * 4 + [b"\r\nepilogue", b"\r\n\r\n"]),
       cut=st.sampled_from([0] * 16 + [1, 5]))
def test_framed_bodies_split_as_the_streaming_parser_parses_them(boundary, parts, before, padding, newline, after,
                                                                 cut):
    """The fast split (framed_parts) takes a body only where python-multipart's parser gives the same
    parts; anything else (preamble, padding, odd or too many header lines, long boundaries, LF framing,
    the delimiter inside content, a body cut short) it leaves to the parser, the judge of malformed
    bodies."""
    raw = before + b"".join(b"--" + boundary + padding + newline
                            + b"".join(name + b":" + value + newline for name, value in headers)
                            + newline + content + newline for headers, content in parts)
    raw += b"--" + boundary + b"--" + after
    raw = raw[:len(raw) - cut]
    framed = framed_parts(boundary, raw)
    event("fast split" if framed is not None else "parser")
    if framed is None:
        return
    streamed = streamed_parts(boundary, raw)  # raises if the parser thinks the body malformed
    assert [(headers, b"".join(chunks)) for headers, chunks in framed] == \
           [(headers, b"".join(chunks)) for headers, chunks in streamed]


@pytest.mark.parametrize("boundary, raw", [
    (b"XB", b"--XB\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(9)) + b"\r\nA\r\n--XB--\r\n"),
    (b"XB", b"--XB\r\nContent-Disposition: form-data; name=file; filename=" + b"a" * 4300 + b"\r\n\r\nA\r\n--XB--"),
    (b"x" * 257, b"--" + b"x" * 257 + b"\r\nContent-Disposition: form-data; name=file\r\n\r\nA\r\n--" + b"x" * 257
     + b"--"),
])
def test_bodies_past_the_parsers_limits_are_left_to_it_and_refused(boundary, raw):
    """Many or long header lines, or a long boundary: the parser's limits refuse them (they cost the
    fast split time and memory on the event loop: 0.4 s and 37 MB for 3 MB of header lines)."""
    assert framed_parts(boundary, raw) is None
    with pytest.raises(InputError) as refused:
        parse_multipart(f"multipart/form-data; boundary={boundary.decode()}", raw)
    assert refused.value.status == 400 and refused.value.message.startswith("malformed multipart body")


def test_a_plain_upload_takes_the_fast_split():
    assert framed_parts(b"XB", body(part("file", b"\x89PNG\r\n", "a.png"), part("model", b"digits-cnn"))) == [
        ({b"content-disposition": b'form-data; name="file"; filename="a.png"'}, [b"\x89PNG\r\n"]),
        ({b"content-disposition": b'form-data; name="model"'}, [b"digits-cnn"])]
