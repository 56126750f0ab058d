"""Hot registration of an exported adapter in a running server: ``POST <url>/admin/adapters``."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

from .errors import ContinualError


def register_adapter(url: str, name: str, path: Path, token: str | None, timeout: float = 60.0) -> dict:
    """POST ``{"name", "path": <absolute dir>}`` with ``Authorization: Bearer <token>``; returns the JSON reply."""
    body = json.dumps({"name": name, "path": str(Path(path).resolve())}).encode()
    req = urllib.request.Request(url.rstrip("/") + "/admin/adapters", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            text = resp.read().decode() or "{}"
    except urllib.error.HTTPError as e:
        raise ContinualError(f"registering {name} at {url} failed: HTTP {e.code} {e.read().decode()[:300]}") from e
    except (urllib.error.URLError, OSError) as e:
        raise ContinualError(f"registering {name} at {url} failed: {e}") from e
    try:
        return json.loads(text)
    except ValueError:
        return {"raw": text}
