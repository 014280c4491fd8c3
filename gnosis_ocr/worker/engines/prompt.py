"""The model's input for one page: the model card's prompt around the page's image tokens.

The prompt's text never changes; only the number of image tokens does, and that follows from the
image's patch grid. So the text is tokenised once, and a page's `input_ids` are put together from the
grid: the page's thread runs only the image processor (numpy, safe to run on many threads at once)
and never waits for the tokenizer, which a fast tokenizer would make it share under a lock.
"""

from __future__ import annotations

import threading

# The model card's own prompt; the model was fine-tuned on it.
PROMPT = (
    "Extract the text from the above document as if you were reading it naturally. Return the tables in html "
    "format. Return the equations in LaTeX representation. If there is an image in the document and image "
    "caption is not present, add a small description of the image inside the <img></img> tag; otherwise, add "
    "the image caption inside <img></img>. Watermarks should be wrapped in brackets. Ex: "
    "<watermark>OFFICIAL COPY</watermark>. Page numbers should be wrapped in brackets. Ex: "
    "<page_number>14</page_number> or <page_number>9/14</page_number>. Prefer using ☐ and ☑ for check boxes."
)


class PagePrompt:
    def __init__(self, processor) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        # Fast tokenizers are not safe to call from many threads at once ("Already borrowed").
        self.lock = threading.Lock()
        messages = [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]},
        ]
        self.text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        image_token = processor.image_token
        self.image_token_id = int(processor.image_token_id)
        before, after = self.text.split(image_token, 1)
        # The image token sits between <|vision_start|> and <|vision_end|>, special tokens that end any
        # merge: tokenising the two sides apart gives the same ids as the whole.
        self.prefix = self.tokenizer(before, add_special_tokens=False)["input_ids"]
        self.suffix = self.tokenizer(after, add_special_tokens=False)["input_ids"]
        self.merge = processor.image_processor.merge_size ** 2

    def inputs(self, page) -> dict:
        """What the processor would return for the prompt and `page` (checked by `matches_processor`)."""
        import torch

        image = self.processor.image_processor(images=[page], return_tensors="pt")
        grid = image["image_grid_thw"]
        ids = torch.tensor([self.prefix + [self.image_token_id] * (int(grid[0].prod()) // self.merge) + self.suffix])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "mm_token_type_ids": (ids == self.image_token_id).to(ids.dtype),
                "pixel_values": image["pixel_values"], "image_grid_thw": grid}

    def reference(self, page) -> dict:
        """The processor's own output for the prompt and `page`."""
        with self.lock:
            return dict(self.processor(text=[self.text], images=[page], return_tensors="pt"))

    def matches_processor(self, page) -> bool:
        import torch

        ours, theirs = self.inputs(page), self.reference(page)
        return ours.keys() >= theirs.keys() and all(
            torch.equal(ours[k], theirs[k]) and ours[k].dtype == theirs[k].dtype for k in theirs)

    def decode(self, tokens: list[int]) -> str:
        with self.lock:
            return self.tokenizer.decode(tokens, skip_special_tokens=True)
