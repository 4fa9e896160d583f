"""Memory: what was said in earlier conversations, found again when it matters (see index.py)."""
