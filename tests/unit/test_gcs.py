"""Which bucket errors a batch waits out and which end a document: a throttled, failing or unreachable
service is tried again later; a missing object, a refusal or a bad request fails the same way again."""

from __future__ import annotations

import pytest
import requests
from google.api_core import exceptions as api
from google.auth.exceptions import TransportError

from gnosis_ocr import gcs


@pytest.mark.parametrize("exc", [
    api.ServiceUnavailable("503"), api.InternalServerError("500"), api.BadGateway("502"), api.GatewayTimeout("504"),
    api.TooManyRequests("429"), api.from_http_status(408, "request timeout"),
    api.RetryError("deadline of 120s exceeded", cause=api.ServiceUnavailable("503")),
    requests.ConnectionError("refused"), requests.Timeout("read timed out"), TransportError("token endpoint"),
    ConnectionResetError("reset"),
])
def test_a_bucket_failing_for_now_is_waited_out(exc):
    assert gcs.transient(exc)


@pytest.mark.parametrize("exc", [
    api.NotFound("no such object"), api.Forbidden("no permission"), api.Unauthorized("401"),
    api.BadRequest("400"), api.PreconditionFailed("412"), ValueError("not a document"),
])
def test_a_missing_object_or_a_refusal_is_not(exc):
    assert not gcs.transient(exc)
