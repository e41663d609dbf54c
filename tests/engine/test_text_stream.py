from engine.text_stream import TextStream


def feed(stream: TextStream, chunks: list[bytes]) -> list[str]:
    return [stream.push(c) for c in chunks] + [stream.finish()]


def test_multibyte_character_split_across_tokens_is_held_until_complete():
    euro = "€".encode()  # 3 bytes
    out = feed(TextStream([]), [b"a", euro[:1], euro[1:2], euro[2:], b"b"])
    assert out == ["a", "", "", "€", "b", ""]
    assert "".join(out) == "a€b"


def test_emoji_zwj_sequence_survives_byte_level_tokens():
    text = "hi 👩‍💻!"
    data = text.encode()
    out = feed(TextStream([]), [data[i : i + 1] for i in range(len(data))])
    assert "".join(out) == text
    assert all("\ufffd" not in piece for piece in out)


def test_stop_string_truncates_and_is_never_shown():
    stream = TextStream(["</end>"])
    out = feed(stream, [b"hello </", b"en", b"d> tail"])
    assert "".join(out) == "hello "
    assert stream.stopped


def test_partial_stop_prefix_is_released_when_it_does_not_complete():
    stream = TextStream(["###"])
    assert stream.push(b"a#") == "a"
    assert stream.push(b"#b") == "##b"
    assert stream.finish() == ""


def test_incomplete_character_at_end_becomes_replacement_char():
    stream = TextStream([])
    assert stream.push("é".encode()[:1]) == ""
    assert stream.finish() == "\ufffd"
