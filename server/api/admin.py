"""Admin endpoints (bearer token ``CLORA_ADMIN_TOKEN``): register, list, inspect, delete, pin adapters.

Also the vLLM-compatible ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``. Registration validates and
stores first; only then is the new version announced, so a bad upload never disturbs what is serving.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from adapters_store.errors import AdapterInvalid, AdapterTooLarge
from adapters_store.spec import Manifest

from ..deps import Core, SettingsDep
from ..errors import AdminDisabled, Unauthorized
from ..state import AppState
from ..threads import in_own_thread

router = APIRouter()


def require_admin(request: Request, settings: SettingsDep) -> None:
    if settings.admin_token is None:
        raise AdminDisabled("admin endpoints are disabled: set CLORA_ADMIN_TOKEN (8+ characters) and restart")
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.encode(),
                                                                settings.admin_token.get_secret_value().encode()):
        raise Unauthorized("missing or wrong admin token: send 'Authorization: Bearer <CLORA_ADMIN_TOKEN>'")


Admin = Annotated[None, Depends(require_admin)]


class RegisterPath(BaseModel):
    name: str = Field(..., description="Adapter name.")
    path: str = Field(..., description="A directory on the server holding the adapter.")
    description: str | None = None
    examples: list[str] | None = None


class LoadLora(BaseModel):
    lora_name: str
    lora_path: str


class UnloadLora(BaseModel):
    lora_name: str


def _manifest(core: AppState, m: Manifest) -> dict[str, Any]:
    d = m.to_dict()
    d["resident"] = {"slot": (m.name, m.version) in core.engine.resident(),
                     "cpu": (m.name, m.version) in core.registry.cpu_keys()}
    return d


def _parse_examples(raw: bytes) -> list[str]:
    out = []
    for i, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            raise AdapterInvalid(f"examples line {i} is not JSON; send one {{\"prompt\": \"...\"}} per line",
                                 param="examples") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise AdapterInvalid(f"examples line {i} needs a string field 'prompt'", param="examples")
        out.append(obj["prompt"])
    return out


async def _save_upload(upload: Any, dest: Path, limit: int) -> None:
    size = 0
    with open(dest, "wb") as f:
        while chunk := await upload.read(1 << 20):
            size += len(chunk)
            if size > limit:
                raise AdapterTooLarge(f"upload exceeds CLORA_MAX_UPLOAD_BYTES ({limit} bytes)", param="file")
            f.write(chunk)


async def _register_multipart(core: AppState, request: Request) -> Manifest:
    limit = core.settings.max_upload_bytes
    declared = int(request.headers.get("content-length") or 0)
    if declared > limit + 1_000_000:
        raise AdapterTooLarge(f"upload of {declared} bytes exceeds CLORA_MAX_UPLOAD_BYTES ({limit})", param="file")
    form = await request.form(max_part_size=limit + 1)
    name, upload = form.get("name"), form.get("file")
    if not isinstance(name, str) or not name:
        raise AdapterInvalid("form field 'name' is required", param="name")
    if upload is None or isinstance(upload, str):
        raise AdapterInvalid("form field 'file' must be a .zip or .tar.gz of a PEFT adapter directory", param="file")
    desc = form.get("description")
    ex_part = form.get("examples")
    examples = None
    if ex_part is not None:
        examples = _parse_examples(ex_part.encode() if isinstance(ex_part, str) else await ex_part.read())
    filename = upload.filename or "adapter.zip"
    suffix = ".tar.gz" if filename.endswith((".tar.gz", ".tgz")) else Path(filename).suffix or ".zip"
    tmp = Path(tempfile.mkdtemp(prefix="clora-upload-"))
    try:
        archive = tmp / f"upload{suffix}"
        await _save_upload(upload, archive, limit)
        return await in_own_thread(core.registry.register_archive, name, archive,
                                   desc if isinstance(desc, str) else None, examples)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@router.post("/admin/adapters", status_code=201)
async def register(request: Request, core: Core, _: Admin) -> JSONResponse:
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        m = await _register_multipart(core, request)
    else:
        try:
            body = RegisterPath.model_validate(await request.json())
        except ValueError as e:
            raise AdapterInvalid(f"send multipart (name, file) or JSON {{name, path}}: {e}", param="body") from None
        m = await in_own_thread(core.registry.register_dir, body.name, Path(body.path), body.description,
                                body.examples)
    return JSONResponse(_manifest(core, m), status_code=201)


@router.get("/admin/adapters")
async def list_adapters(core: Core, _: Admin) -> dict:
    return {"adapters": [_manifest(core, m) for m in core.registry.manifests()]}


@router.get("/admin/adapters/{name}")
async def get_adapter(name: str, core: Core, _: Admin) -> dict:
    m = core.registry.resolve(name)
    return {**_manifest(core, m), "versions": core.registry.store.versions(name)}


@router.delete("/admin/adapters/{name}", status_code=204)
async def delete_adapter(name: str, core: Core, _: Admin) -> Response:
    await asyncio.to_thread(core.registry.unregister, name)
    return Response(status_code=204)


async def _hold(core: AppState, name: str, held: bool) -> dict:
    m = core.registry.resolve(name)
    done = core.engine.hold_adapter((m.name, m.version), held)
    await asyncio.to_thread(done.result, 30)  # NoSlotFree: 409
    return _manifest(core, m) | {"pinned": held}


@router.post("/admin/adapters/{name}/pin")
async def pin(name: str, core: Core, _: Admin) -> dict:
    return await _hold(core, name, True)


@router.post("/admin/adapters/{name}/unpin")
async def unpin(name: str, core: Core, _: Admin) -> dict:
    return await _hold(core, name, False)


@router.post("/v1/load_lora_adapter")
async def load_lora(body: LoadLora, core: Core, _: Admin) -> JSONResponse:
    m = await in_own_thread(core.registry.register_dir, body.lora_name, Path(body.lora_path))
    return JSONResponse({"status": "ok", "lora_name": m.name, "version": m.version}, status_code=200)


@router.post("/v1/unload_lora_adapter")
async def unload_lora(body: UnloadLora, core: Core, _: Admin) -> dict:
    await asyncio.to_thread(core.registry.unregister, body.lora_name)
    return {"status": "ok", "lora_name": body.lora_name}
