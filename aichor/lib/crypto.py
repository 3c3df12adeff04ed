"""Encryption at rest for secrets the server must read back (webhook secrets, sensitive variables)."""

import base64
import hashlib
import os

from cryptography.fernet import Fernet, InvalidToken
from django.conf import settings


def _fernet() -> Fernet:
    # A dedicated key may be set; otherwise one is derived from SECRET_KEY so the embedded
    # default needs no extra configuration.
    raw = os.environ.get("AICHOR_ENCRYPTION_KEY") or settings.SECRET_KEY
    key = base64.urlsafe_b64encode(hashlib.sha256(("aichor-at-rest:" + raw).encode()).digest())
    return Fernet(key)


def encrypt(plain: str) -> str:
    return _fernet().encrypt(plain.encode()).decode()


def decrypt(token: str) -> str:
    try:
        return _fernet().decrypt(token.encode()).decode()
    except InvalidToken:
        raise ValueError("secret cannot be decrypted: was AICHOR_ENCRYPTION_KEY or SECRET_KEY changed?") from None
