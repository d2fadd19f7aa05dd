"""The data the project draws itself: photos and drawings of digits (training/digits_synth.py),
non-digit pictures (training/nondigits.py) and the synthetic crops' files (training/synthetic.py):
deterministic per seed, whatever the number of processes, and read the way the server reads uploads."""
import numpy as np
import pytest

from training import digits, digits_synth, nondigits, svhn, synthetic


def test_photos_and_drawings_are_the_same_for_a_seed_whatever_the_processes(monkeypatch):
    monkeypatch.setattr(digits_synth, "CHUNK", 20)
    one = digits_synth.make(50, 7, 1, "test")
    two = digits_synth.make(50, 7, 2, "test")
    assert np.array_equal(one[0], two[0]) and np.array_equal(one[1], two[1])
    x, y = one
    assert x.shape == (50, 1, 8, 8) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 16
    assert set(y) <= set(range(10)) and len(set(y)) > 5
    assert not np.array_equal(digits_synth.make(50, 8, 1, "test")[0], x)  # another seed, other pictures


def test_every_digit_has_its_ways_of_being_drawn_including_plain_7s_and_footed_1s():
    assert set(digits_synth.VARIANTS) == set(range(10))
    assert len(digits_synth.VARIANTS[7]) == 2 and len(digits_synth.VARIANTS[1]) == 3 and len(digits_synth.VARIANTS[4]) == 2
    rng = np.random.default_rng(0)
    for digit in range(10):
        ink = np.asarray(digits_synth.drawn(rng, digit, 200, 200))
        assert ink.max() == 255 and 0.01 < (ink > 0).mean() < 0.5, digit


def test_the_written_record_lists_the_files_and_ensure_reuses_them(tmp_path, monkeypatch):
    counts = {"train": 12, "val": 6, "test": 6, "outliers": 6}
    record = digits_synth.write(tmp_path, counts, 3, 1)
    assert {split: item["n"] for split, item in record["files"].items()} == counts
    written = (tmp_path / "train.npz").stat().st_mtime_ns
    monkeypatch.setattr(digits_synth, "write", lambda *args: pytest.fail("made again"))
    assert digits_synth.ensure(tmp_path, 1) == record and (tmp_path / "train.npz").stat().st_mtime_ns == written
    x, y = digits_synth.load(tmp_path, "outliers")
    assert x.shape == (6, 1, 8, 8) and set(y) == {-1}
    assert "1,000 + 12 training images, 350 + 6 validation" in digits_synth.data_record(record)["description"]


def test_non_digit_pictures_are_fed_as_the_model_takes_them_and_kept_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    nondigits.for_spec.cache_clear()
    grey = nondigits.pictures_for(digits.INPUT_SPEC, 12, 1)
    colour = nondigits.pictures_for(svhn.INPUT_SPEC, 12, 1)
    assert grey.shape == (12, 1, 8, 8) and grey.dtype == np.float32 and grey.max() <= 16
    assert colour.shape == (12, 3, 32, 32) and colour.dtype == np.uint8
    assert len(list((tmp_path / "digitserve").glob("nondigits-*.npy"))) == 2
    nondigits.for_spec.cache_clear()
    monkeypatch.setattr(nondigits, "make", lambda *args: pytest.fail("drawn again"))
    assert np.array_equal(nondigits.pictures_for(digits.INPUT_SPEC, 12, 1), grey)
    assert not nondigits.supported({**digits.INPUT_SPEC, "shape": [None, 1, 16, 16]})


def test_synthetic_crop_files_are_the_same_bytes_for_the_same_seed(tmp_path):
    """SciPy wrote the time into each file's header: the MD5 a manifest records changed with every run."""
    synthetic.write_synthetic(tmp_path / "a", 30, 10, 0)
    synthetic.write_synthetic(tmp_path / "b", 30, 10, 0)
    for name in ("train_32x32.mat", "test_32x32.mat"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
