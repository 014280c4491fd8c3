"""What a succeeded job gives back: its pages' text, as the API answers it and a batch writes it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .job import Job


@dataclass(frozen=True)
class PageResult:
    text: str
    truncated: bool = False


def result_object(job: Job, pages: list[PageResult]) -> dict:
    """A succeeded job's result, as GET /v1/jobs/{id}/result answers and a batch writes it."""
    opts = job.options
    return {
        "id": job.id,
        "model": {"id": job.model_id, "revision": job.model_revision},
        "options": opts.to_api(),
        # Numbered as in the document, also when only some of its pages were asked for.
        "pages": [{"page": opts.document_page(i) + 1, "text": p.text, "truncated": p.truncated}
                  for i, p in enumerate(pages)],
        "text": result_text(pages),
    }


def result_text(pages: list[PageResult]) -> str:
    return "\n\n".join(p.text for p in pages)
