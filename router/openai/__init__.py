"""The OpenAI-compatible HTTP API of the router: a second door into the same dispatcher.

- ``protocol``: the JSON bodies (types only; every value rule lives in
  ``router/validation.py`` and the worker, reached through the protobuf request);
- ``convert``: a body into a ``ChatRequest``/``GenerateRequest``, and a field of
  those back into the body's name for error messages;
- ``chunks``: events into OpenAI chunks and complete responses;
- ``errors``: ``RequestError`` into OpenAI's error body and HTTP status;
- ``app``: the aiohttp routes and the listener.
"""
