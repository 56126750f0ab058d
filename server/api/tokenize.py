"""vLLM's ``/tokenize`` and ``/detokenize``: the served model's tokenizer, for clients that count tokens or build
prompts of ids. Every adapter shares the base model's tokenizer; a ``model`` that names none is a 404 all the same."""

from __future__ import annotations

from fastapi import APIRouter

from ..deps import Core
from ..routing import AUTO
from ..schemas import DetokenizeRequest, TokenizeRequest, chat_messages
from ..state import AppState

router = APIRouter()


def _check_model(core: AppState, model: str | None) -> None:
    if model and model != AUTO:
        core.routing.explicit(model)  # AdapterNotFound (404) names the known ones


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, core: Core) -> dict:
    _check_model(core, body.model)
    gen = core.generator
    if body.messages is not None:
        ids = gen.encode_chat(gen.chat_prompt(chat_messages(body.messages), body.add_generation_prompt,
                                              body.continue_final_message))
    else:
        ids = gen.encode(body.prompt or "", body.add_special_tokens)
    strs = gen.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
    return {"count": len(ids), "max_model_len": gen.max_len, "tokens": ids, "token_strs": strs}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, core: Core) -> dict:
    _check_model(core, body.model)
    core.generator.known(body.tokens, "tokens")
    return {"prompt": core.generator.tokenizer.decode(body.tokens)}
