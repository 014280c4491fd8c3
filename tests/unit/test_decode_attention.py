"""The decode step's two attentions (`engines/attention.py`): where FlashAttention's variable-length kernel
serves, and that a kernel which disagrees with SDPA never does. The kernel runs only on CUDA; here the
engine's calls go to a plain-torch reference of its contract (`harness/flashref.py`)."""

from __future__ import annotations

import functools

import pytest
import torch

from gnosis_ocr.worker.engines import attention
from harness import flashref

SHAPE = {"heads": 8, "kv_heads": 2, "head_dim": 16, "scale": 0.25}  # 4 query heads per KV head


@pytest.fixture
def kernel(monkeypatch):
    """A device that has the kernel: `kernel(fn)` puts `fn` where the engine calls it."""
    monkeypatch.setattr(attention, "unavailable", lambda *args: None)

    def install(fn):
        monkeypatch.setattr(attention, "varlen", fn)
    install(flashref.varlen)
    return install


def choose(mode: str = "flash") -> dict:
    return attention.choose(mode, torch.device("cpu"), torch.float32, **SHAPE)


def test_a_kernel_that_keeps_the_contract_serves(kernel):
    check = choose()
    assert check["attention"] == "flash"
    assert check["relative_error"] < 1e-6


@pytest.mark.parametrize("broken", [
    pytest.param(functools.partial(flashref.varlen, honour_used=False), id="reads-past-each-pages-length"),
    pytest.param(functools.partial(flashref.varlen, head_map=lambda h: h % 2), id="pairs-heads-wrongly"),
])
def test_a_kernel_that_computes_something_else_is_refused(kernel, broken):
    kernel(broken)
    check = choose()
    assert check["attention"] == "sdpa"
    assert check["reason"] == "FlashAttention differs from SDPA"
    assert check["relative_error"] > 0.1


def test_a_kernel_that_raises_is_refused_and_the_worker_goes_on(kernel):
    def raises(*args):
        raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.")
    kernel(raises)
    check = choose()
    assert check["attention"] == "sdpa"
    assert "Ampere" in check["reason"]


def test_a_device_that_cannot_say_whether_it_has_the_kernel_decodes_with_sdpa(monkeypatch):
    def fails(*args):
        raise RuntimeError("CUDA error: unspecified launch failure")
    monkeypatch.setattr(attention, "unavailable", fails)
    check = choose()
    assert check["attention"] == "sdpa" and "unspecified launch failure" in check["reason"]


def test_sdpa_when_asked_or_where_there_is_no_kernel():
    assert choose("sdpa") == {"attention": "sdpa", "reason": "OCR_DECODE_ATTENTION=sdpa"}
    assert choose()["reason"] == "no FlashAttention kernel on cpu"


def test_the_cpu_engine_decodes_with_sdpa_and_says_why(tiny_model):
    from gnosis_ocr.worker.engines.nanonets import NanonetsEngine

    engine = NanonetsEngine(tiny_model, model_id="test/tiny", revision="0" * 40, devices=["cpu"], max_new_tokens=4,
                            batch_size=1, repetition_window=0)
    try:
        assert engine.attention_checks == [
            {"device": "cpu", "attention": "sdpa", "reason": "no FlashAttention kernel on cpu"}]
    finally:
        engine.close()
