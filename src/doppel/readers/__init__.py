"""Chat export readers: one module per format, each turning an export into chats and messages."""
