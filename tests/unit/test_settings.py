"""The settings object: each variable read as its field's type, each default from defaults.py, and
every variable documented in docs/configuration.md."""

from __future__ import annotations

import dataclasses

import pytest

from gnosis_ocr import defaults
from gnosis_ocr.errors import ConfigError
from gnosis_ocr.settings import Settings
from harness import ROOT


def test_each_variable_is_read_as_its_fields_type():
    s = Settings.from_env({"GNOSIS_DOWNLOAD_STALL_TIMEOUT": "2.5", "GNOSIS_CACHE_VISIBILITY_WAIT": "0.5",
                           "OCR_DEVICE": "cuda:0, cuda:1", "GNOSIS_METRICS_OPEN": "off", "GNOSIS_MAX_PAGES": "7",
                           "GNOSIS_PAGE_SOFT_TIMEOUT": "100"})
    assert (s.download_stall_timeout, s.cache_visibility_wait) == (2.5, 0.5)  # seconds may be fractional
    assert s.device == ("cuda:0", "cuda:1") and s.metrics_open is False and s.max_pages == 7
    assert s.page_hard_timeout == 100 + defaults.PAGE_HARD_TIMEOUT_GRACE
    with pytest.raises(ConfigError, match="GNOSIS_MAX_PAGES='1.5' is not an integer"):
        Settings.from_env({"GNOSIS_MAX_PAGES": "1.5"})


def test_every_variable_has_its_default_in_defaults_and_a_line_in_the_configuration_reference():
    documented = (ROOT / "docs" / "configuration.md").read_text()
    for f in dataclasses.fields(Settings):
        name = f.metadata["env"]
        assert f"`{name}`" in documented, f"{name} is not in docs/configuration.md"
        if f.name != "api_key_hashes":  # the keys themselves are never a default
            assert f.default == getattr(defaults, f"DEFAULT_{f.name.upper()}"), f.name
