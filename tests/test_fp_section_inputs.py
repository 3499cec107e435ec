"""FramePack section prompt/image syntax (`0:a;;;2-3:b;;;-1:c`), as the reference parses it."""

import pytest

from musubi_tuner.architectures.framepack.section_inputs import parse_section_strings, section_key
from musubi_tuner.errors import UserError


def test_plain_string_is_section_zero_even_with_a_colon():
    assert parse_section_strings("a cat: sitting") == {0: "a cat: sitting"}
    assert parse_section_strings("3:only one part") == {0: "3:only one part"}
    assert parse_section_strings(None) == {}


def test_indices_ranges_and_negative_indices():
    values = parse_section_strings("0:a ;;; 2-3: b;;;-1:c")
    assert values == {0: "a", 2: "b", 3: "b", -1: "c"}


def test_section_zero_filled_from_lowest_index():
    assert parse_section_strings("2:b;;;1:a")[0] == "a"
    assert parse_section_strings("-1:z;;;-3:x")[0] == "x"
    assert parse_section_strings("-1:z;;;4:y")[0] == "y"


def test_part_without_index_is_section_zero_and_empty_parts_are_skipped():
    assert parse_section_strings("first;;;1:second;;;") == {0: "first", 1: "second"}
    assert parse_section_strings(r"C:\img\a.png;;;1:b.png")[0] == r"C:\img\a.png"


def test_backwards_range_is_an_error_naming_the_flag():
    with pytest.raises(UserError, match="--image_path: section range '3-1'"):
        parse_section_strings("3-1:x;;;0:y", flag="--image_path")


def test_section_lookup_prefers_from_last_then_index_then_zero():
    values = {0: "a", 2: "b", -1: "c"}
    assert section_key(values, 3, -1) == -1  # last of 4
    assert section_key(values, 2, -2) == 2
    assert section_key(values, 1, -3) == 0
