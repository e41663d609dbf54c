"""The throughput meter: figures, acceptance, the last-minute sparkline."""

from __future__ import annotations

from app.meter import SPARK_WINDOW_S, Sparkline, ThroughputMeter, format_bytes, stats_summary
from engine.api import GenerationStats


def test_meter_shows_stats_and_keeps_final_figures(qtbot):
    m = ThroughputMeter()
    qtbot.addWidget(m)
    m.begin_answer()
    s = GenerationStats(
        prompt_tokens=3010,
        cached_tokens=2950,
        new_tokens=42,
        decode_tok_per_s=25.34,
        prefill_tok_per_s=812.0,
        ttft_seconds=0.314,
        drafted=40,
        accepted=30,
        acceptance_length=2.5,
        kv_bytes=3 * 1024 * 1024,
        device="cpu",
    )
    m.update_stats(s)
    v = {k: lbl.text() for k, lbl in m.values.items()}
    assert v == {
        "decode": "25.3",
        "prefill": "812",
        "ttft": "0.31 s",
        "cached": "2,950 / 3,010",
        "acceptance": "2.50 · 75%",
        "kv": "3.0 MiB",
        "device": "cpu",
    }
    assert m.live_decode == 25.34
    m.end_answer(s, "eos")
    assert not m.streaming and m.values["decode"].text() == "25.3" and "eos" in m.state.text()
    assert (
        stats_summary(s)
        == "42 tokens · 25.3 tok/s · TTFT 0.31 s · cached 2,950 / 3,010 tokens · 2.50 tok/step (75% accepted)"
        " · prefill 812 tok/s"
    )


def test_cached_tokens_follow_each_answer(qtbot):
    """A cold answer shows 0 cached; the live figure updates with every stats event; no prompt: a dash."""
    m = ThroughputMeter()
    qtbot.addWidget(m)
    assert m.values["cached"].text() == "–" and "snapshot" in m.values["cached"].toolTip()
    m.begin_answer()
    m.update_stats(GenerationStats(prompt_tokens=3010, cached_tokens=0, decode_tok_per_s=1.0))
    assert m.values["cached"].text() == "0 / 3,010"
    m.end_answer(GenerationStats(prompt_tokens=3010, cached_tokens=0, new_tokens=5), "eos")
    assert "cached" not in stats_summary(GenerationStats(prompt_tokens=3010, new_tokens=5))
    m.begin_answer()
    m.update_stats(GenerationStats(prompt_tokens=3062, cached_tokens=3047))
    assert m.values["cached"].text() == "3,047 / 3,062"
    m.update_stats(GenerationStats())
    assert m.values["cached"].text() == "–"


def test_no_draft_shows_no_acceptance(qtbot):
    m = ThroughputMeter()
    qtbot.addWidget(m)
    m.update_stats(GenerationStats(decode_tok_per_s=1.0))
    assert m.values["acceptance"].text() == "–"
    assert "accepted" not in stats_summary(GenerationStats(new_tokens=1))


def test_sparkline_keeps_the_last_minute(qtbot):
    s = Sparkline()
    qtbot.addWidget(s)
    for t in range(0, 121):
        s.add(float(t), now=1000.0 + t)
    assert s.samples[0] == (1000.0 + 120 - SPARK_WINDOW_S, 120.0 - SPARK_WINDOW_S)
    assert len(s.samples) == int(SPARK_WINDOW_S) + 1
    s.resize(200, 40)
    s.grab()  # paints without error


def test_format_bytes():
    assert [format_bytes(n) for n in (512, 2048, 5 * 1024**2, 3 * 1024**3)] == [
        "512 B",
        "2.0 KiB",
        "5.0 MiB",
        "3.0 GiB",
    ]
