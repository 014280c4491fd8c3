"""Nanonets-OCR-s (a Qwen2.5-VL-3B fine-tune) through transformers, loaded offline from a snapshot path."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

# The model card's own prompt; the model was fine-tuned on it.
PROMPT = (
    "Extract the text from the above document as if you were reading it naturally. Return the tables in html "
    "format. Return the equations in LaTeX representation. If there is an image in the document and image "
    "caption is not present, add a small description of the image inside the <img></img> tag; otherwise, add "
    "the image caption inside <img></img>. Watermarks should be wrapped in brackets. Ex: "
    "<watermark>OFFICIAL COPY</watermark>. Page numbers should be wrapped in brackets. Ex: "
    "<page_number>14</page_number> or <page_number>9/14</page_number>. Prefer using ☐ and ☑ for check boxes."
)


class NanonetsEngine:
    def __init__(self, path: str | Path, *, model_id: str, revision: str, device: str = "auto",
                 max_new_tokens: int = 4096, threads: int = 0) -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.model_id = model_id
        self.model_revision = revision
        self.max_new_tokens = max_new_tokens
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if threads > 0 and self.device.type == "cpu":
            torch.set_num_threads(threads)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        # A path, never a repo id: with HF_HUB_OFFLINE=1 this sends no request at all.
        self.processor = AutoProcessor.from_pretrained(str(path))
        # Batched generation needs the prompt flush against the new tokens.
        self.processor.tokenizer.padding_side = "left"
        self.model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=dtype).to(self.device).eval()
        log.info("loaded %s@%s on %s (%s)", model_id, revision[:12], self.device, dtype)

    def recognize(self, pages: Sequence) -> list[str]:
        import torch

        messages = [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]},
        ]
        prompt = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = self.processor(text=[prompt] * len(pages), images=list(pages), padding=True, return_tensors="pt")
        inputs = inputs.to(self.device)
        with torch.inference_mode():
            output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        generated = output[:, inputs["input_ids"].shape[1]:]
        return self.processor.batch_decode(generated, skip_special_tokens=True, clean_up_tokenization_spaces=True)
