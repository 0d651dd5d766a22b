import pytest

from batchfinder.units import format_bytes, parse_bytes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("64MiB", 64 * 1024**2),
        ("16GB", 16 * 10**9),
        ("16GiB", 16 * 1024**3),
        ("1.5 GiB", 1_610_612_736),
        ("512", 512),
        ("7kb", 7000),
        (4096, 4096),
        ("2 tib", 2 * 1024**4),
    ],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["", "lots", "12 parsecs", "-5MiB", "MiB", "1e9"])
def test_parse_bytes_rejects_garbage_with_a_helpful_message(bad):
    with pytest.raises(ValueError, match="capacity=.*(memory size|positive)"):
        parse_bytes(bad)


def test_parse_bytes_rejects_zero_negative_and_wrong_types():
    with pytest.raises(ValueError, match="positive"):
        parse_bytes(0)
    with pytest.raises(ValueError, match="positive"):
        parse_bytes(-3)
    with pytest.raises(TypeError):
        parse_bytes(3.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        parse_bytes(True)


def test_format_bytes():
    assert format_bytes(3136) == "3.06 KiB"
    assert format_bytes(512) == "512 B"
    assert format_bytes(64 * 1024**2) == "64.00 MiB"
    assert format_bytes(40 * 1024**3) == "40.00 GiB"
    assert format_bytes(None) == "-"
    assert format_bytes(-2048) == "-2.00 KiB"
