"""Realtime speech sessions (docs/contracts.md#realtime-speech): text streamed in, audio
streamed out.

The protocol lives apart from I/O, in h11's manner: `protocol` holds the messages as small
frozen classes and parses client frames, `session` is a pure state machine fed client
events that returns actions, `turns` shares render starts between sessions round robin,
and `tokens` signs browser session tokens. The WebSocket door that runs it all over a
socket, through the one request core, is `edge.handlers.realtime`.
"""
