"""How the store keeps a secret token (session or share link): its SHA-256, never itself."""

from __future__ import annotations

import hashlib

__all__ = ["hash_token"]


def hash_token(token: str) -> str:
    """SHA-256 hex of a token, the form the tables keep."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()
