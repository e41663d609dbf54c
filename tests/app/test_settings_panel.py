"""Settings panel: the skip-WHT switch, validation in the panel, persistence."""

from __future__ import annotations

import pytest

from app.engine_settings import EngineSettings
from engine.errors import SettingsError


def wait_ready(qtbot, w):
    if w.controller.model_info is None:
        with qtbot.waitSignal(w.controller.model_ready, timeout=10000):
            pass


@pytest.mark.parametrize("k_type", ["f16", "bf16", "q8_0", "q4_0", "q4_1"])
def test_skip_wht_enabled_only_for_q4_0_k(qtbot, k_type):
    from app.settings_panel import SettingsPanel

    panel = SettingsPanel()
    qtbot.addWidget(panel)
    panel.skip_wht.setEnabled(True)
    panel.kv_k.setCurrentIndex(panel.kv_k.findData("q4_0"))
    assert panel.skip_wht.isEnabled()
    panel.skip_wht.setChecked(True)
    panel.kv_k.setCurrentIndex(panel.kv_k.findData(k_type))
    assert panel.skip_wht.isEnabled() == (k_type == "q4_0")
    assert panel.settings().skip_wht == (k_type == "q4_0")
    assert "q4_0" in panel.skip_wht.text() and "rotation" in panel.skip_wht.toolTip()


def test_engine_receives_skip_wht(make_window, qtbot, fake_engine):
    w = make_window()
    wait_ready(qtbot, w)
    p = w.settings_panel
    p.kv_k.setCurrentIndex(p.kv_k.findData("q4_0"))
    p.kv_v.setCurrentIndex(p.kv_v.findData("q8_0"))
    p.skip_wht.setChecked(True)
    with qtbot.waitSignal(w.controller.model_ready, timeout=10000):
        assert p.apply()
    cfg = fake_engine.configs[-1]
    assert (cfg.kv_k, cfg.kv_v, cfg.skip_wht) == ("q4_0", "q8_0", True)
    assert cfg.rotation_skipped()
    # switching K away from q4_0 turns it off, and the engine gets False
    p.kv_k.setCurrentIndex(p.kv_k.findData("q8_0"))
    with qtbot.waitSignal(w.controller.model_ready, timeout=10000):
        assert p.apply()
    assert fake_engine.configs[-1].skip_wht is False


def test_invalid_combination_is_explained_in_panel(make_window, qtbot, fake_engine, tmp_path):
    w = make_window()
    wait_ready(qtbot, w)
    n_loads = len(fake_engine.configs)
    p = w.settings_panel
    p.draft_mode.setCurrentIndex(p.draft_mode.findData("dflash"))
    p.draft_path.setText(str(tmp_path))  # a folder without config.json / model.safetensors
    assert not p.apply()
    assert p.error.isVisibleTo(p) and "config.json" in p.error.text()
    p.draft_mode.setCurrentIndex(p.draft_mode.findData("none"))
    p.max_tokens.setValue(5000)
    p.context_length.setValue(4096)
    assert not p.apply()
    assert "context length" in p.error.text()
    p.model_path.setText(str(tmp_path / "missing.gguf"))
    p.max_tokens.setValue(100)
    assert not p.apply()
    assert "does not exist" in p.error.text()
    assert len(fake_engine.configs) == n_loads  # nothing was reloaded


def test_engine_settings_validation_messages():
    with pytest.raises(SettingsError, match="q4_0"):
        EngineSettings(kv_k="q8_0", skip_wht=True).check()
    cfg = EngineSettings(kv_k="q4_0", kv_v="q4_1", skip_wht=True, draft_mode="none").to_engine_config(
        "m.gguf", None
    )
    assert cfg.skip_wht and cfg.kv_v == "q4_1" and cfg.draft.mode == "none"


def test_settings_persist_across_restart(make_window, qtbot, fake_engine, tmp_path):
    from PySide6.QtCore import QSettings

    ini = str(tmp_path / "persist.ini")
    w = make_window(settings_=QSettings(ini, QSettings.IniFormat))
    wait_ready(qtbot, w)
    p = w.settings_panel
    p.kv_k.setCurrentIndex(p.kv_k.findData("q4_0"))
    p.skip_wht.setChecked(True)
    p.kv_v.setCurrentIndex(p.kv_v.findData("q4_1"))
    p.temperature.setValue(0.7)
    p.prefill_chunk.setValue(256)
    p.draft_mode.setCurrentIndex(p.draft_mode.findData("ngram"))
    p.theme.setCurrentIndex(p.theme.findData("dark"))
    w.tint_action.setChecked(True)
    with qtbot.waitSignal(w.controller.model_ready, timeout=10000):
        assert p.apply()
    w.close()

    w2 = make_window(settings_=QSettings(ini, QSettings.IniFormat))
    wait_ready(qtbot, w2)
    s = w2.engine_settings
    assert (s.kv_k, s.kv_v, s.skip_wht, s.temperature, s.prefill_chunk, s.draft_mode) == (
        "q4_0",
        "q4_1",
        True,
        pytest.approx(0.7),
        256,
        "ngram",
    )
    assert w2.settings_panel.skip_wht.isChecked() and w2.settings_panel.skip_wht.isEnabled()
    assert w2.settings_panel.theme.currentData() == "dark"
    assert w2.tint_action.isChecked()
    cfg = fake_engine.configs[-1]
    assert (cfg.kv_k, cfg.kv_v, cfg.skip_wht, cfg.prefill_chunk, cfg.draft.mode) == (
        "q4_0",
        "q4_1",
        True,
        256,
        "ngram",
    )


def test_k_equalization_setting_reaches_the_engine_config(qtbot):
    from app.settings_panel import SettingsPanel

    panel = SettingsPanel()
    qtbot.addWidget(panel)
    panel.set_settings(EngineSettings(kv_k="q4_0", k_equalize="off"))
    assert panel.k_equalize.currentData() == "off"
    panel.k_equalize.setCurrentIndex(panel.k_equalize.findData("on"))
    s = panel.settings()
    on_gpu = s.resolved(on_gpu=True)  # draft mode "auto" made concrete, as the worker does
    assert s.k_equalize == "on" and on_gpu.to_engine_config("m.gguf", "d.gguf").k_equalize == "on"
    assert EngineSettings().resolved(on_gpu=True).to_engine_config("m.gguf", "d.gguf").k_equalize == "auto"


def test_automatic_draft_mode_is_the_default_and_resolves_by_device():
    settings = EngineSettings()
    assert settings.draft_mode == "auto"
    settings.check()  # valid without a GPU probe (checked as its CPU resolution)
    assert settings.resolved(on_gpu=False).draft_mode == "none"
    assert settings.resolved(on_gpu=True).draft_mode == "ngram"
    chosen = EngineSettings(draft_mode="ngram")
    assert chosen.resolved(on_gpu=False) is chosen and chosen.resolved(on_gpu=True) is chosen


def test_panel_offers_and_round_trips_automatic_draft_mode(qtbot):
    from app.settings_panel import SettingsPanel

    panel = SettingsPanel()
    qtbot.addWidget(panel)
    panel.set_settings(EngineSettings(draft_mode="none"))
    panel.set_settings(EngineSettings())
    assert panel.draft_mode.currentData() == "auto"
    assert not panel.draft_path.isEnabled() and panel.max_draft.isEnabled()
    assert panel.settings().draft_mode == "auto"
