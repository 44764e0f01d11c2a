"""`pdserve chaos`: kill or pause random stages of a running stack under streaming load and check
that no request hangs, is cut or loses a token, and that the stack recovers (issue 13)."""
