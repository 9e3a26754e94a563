"""Two ways the worker reads a streamed completion through the `openai`
client that its public API does not offer. Targets openai 3.51
(`openai._streaming.SSEDecoder`, `OpenAI._make_sse_decoder`, and
`OpenAI.post(..., cast_to=object, stream=True, stream_cls=Stream[object])`).

- `openai_drain`: read the response to its end when `[DONE]` arrives, so
  the connection goes back to the client's pool. The client stops reading
  at `[DONE]` and closes the response with the end of the chunked body
  (`0\\r\\n\\r\\n`) unread, so httpcore drops the connection, and every
  completion (each turn, each tool round) opens a new one: against the
  offline model over TLS on loopback, 2.1-2.3 ms more to the first token and
  about 1 ms more client CPU per completion, and over a real network the
  TCP and TLS handshakes' round trips on top (openai-python #3440, open). A
  server that held its response open after `[DONE]` would hold the turn
  until OPENAI_TIMEOUT, and then the connection is dropped as before.
- `openai_dict_chunks`: the client's own request path (auth, retries,
  timeouts, errors, SSE decoding, an `error` event raising APIError), with
  each chunk left as the dict it decoded to: building a pydantic
  ChatCompletionChunk per chunk costs about 200 µs of CPU, most of what a
  delta costs the worker.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from openai import OpenAI, Stream
from openai._streaming import ServerSentEvent, SSEDecoder


class _DrainingDecoder(SSEDecoder):
    def iter_bytes(self, iterator: Iterator[bytes]) -> Iterator[ServerSentEvent]:
        for sse in super().iter_bytes(iterator):
            if sse.data.startswith("[DONE]"):
                try:
                    for _ in iterator:
                        pass
                except Exception:  # the answer is complete: the connection is dropped, as before
                    pass
            yield sse


class DrainingClient(OpenAI):
    """The openai client whose streams read their response to its end."""

    def _make_sse_decoder(self) -> SSEDecoder:
        return _DrainingDecoder()


def dict_chunks(client: OpenAI, body: dict[str, Any]) -> Stream[object]:
    """POST /chat/completions as a stream of dicts, one per chunk."""
    return client.post("/chat/completions", body=body, cast_to=object, stream=True, stream_cls=Stream[object])
