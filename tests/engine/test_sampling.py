"""Row sampling and text assembly, on the real SmolLM2 tokenizer (no model needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from server.engine.sampling import RowSampler, SamplingParams, TextAssembler, first_argmax
from server.engine.slots import SlotTable


@pytest.fixture(scope="module")
def tok(smollm2_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def test_greedy_and_top_k_1_pick_the_argmax() -> None:
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    best = int(logits.argmax())
    assert RowSampler(SamplingParams(temperature=0))(logits) == best
    assert RowSampler(SamplingParams(temperature=1.0, top_k=1, seed=3))(logits) == best


@pytest.mark.parametrize("vocab", [49152, 1000, 1001], ids=["blocks of 64", "blocks of 8", "no blocks"])
def test_first_argmax_is_torchs_argmax_ties_nan_and_inf_included(vocab: int) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(-3, 4, (6, vocab), generator=g).float()  # every maximum is tied many times over
    logits[1] = torch.randn(vocab, generator=g)
    logits[2] = float("-inf")
    logits[3, vocab // 2] = float("nan")
    logits[4, -1] = 9.0  # the maximum in the last block
    logits[5, 0] = 9.0  # and in the first
    assert first_argmax(logits) == logits.argmax(-1).tolist()
    assert first_argmax(logits)[4:] == [vocab - 1, 0]


def test_a_greedy_row_takes_the_batch_argmax_unless_its_logits_are_shaped() -> None:
    logits = torch.tensor([0.0, 5.0, 4.0, 2.5])
    assert RowSampler(SamplingParams(temperature=0))(logits, argmax=1) == 1
    # a bias moves the maximum: the batch's argmax (of the unshaped logits) no longer holds for this row
    assert RowSampler(SamplingParams(temperature=0, logit_bias=((3, 3.0),)))(logits, argmax=1) == 3
    s = RowSampler(SamplingParams(temperature=0, min_tokens=1), end_ids=frozenset({1}))
    assert [s(logits, argmax=1), s(logits, argmax=1)] == [2, 1]


def test_seed_reproducible_and_top_p_restricts_support() -> None:
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    p = SamplingParams(temperature=1.0, seed=42)
    a = [RowSampler(p)(logits) for _ in range(3)]
    s1, s2 = RowSampler(p), RowSampler(p)
    assert [s1(logits) for _ in range(20)] == [s2(logits) for _ in range(20)] and len(set(a)) == 1
    top = set(torch.topk(logits, 5).indices.tolist())
    probs = torch.softmax(logits, -1)
    mass = float(torch.sort(probs, descending=True).values[:5].sum())
    s = RowSampler(SamplingParams(temperature=1.0, top_p=mass - 1e-4, seed=7))
    assert {s(logits) for _ in range(200)} <= top


def test_penalties_follow_the_openai_and_vllm_formulas() -> None:
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, 1.0])
    s = RowSampler(SamplingParams(temperature=0, frequency_penalty=0.5, presence_penalty=0.25,
                                  repetition_penalty=2.0), prompt_ids=[1, 2])
    s.counts.update([3, 3, 0])  # the output so far: token 3 twice, token 0 once
    s.seen.update([3, 0])
    want = torch.tensor([2.0 / 2 - 0.5 - 0.25, -1.0 * 2, 0.5 / 2, 3.0 / 2 - 1.0 - 0.25, 1.0])
    assert torch.allclose(s._shape(logits), want)
    assert torch.equal(logits, torch.tensor([2.0, -1.0, 0.5, 3.0, 1.0]))  # the batch's logits are left alone


def test_a_penalty_steers_greedy_decoding_off_tokens_already_output() -> None:
    logits = torch.tensor([0.0, 5.0, 4.0, 2.5])  # the same logits every step: greedy repeats token 1
    plain = RowSampler(SamplingParams(temperature=0))
    assert [plain(logits) for _ in range(4)] == [1, 1, 1, 1]
    # frequency: each occurrence costs 2 (token 1: 5, 3, 3, 1); presence: 2 once, however often it recurs
    fp = RowSampler(SamplingParams(temperature=0, frequency_penalty=2.0))
    assert [fp(logits) for _ in range(4)] == [1, 2, 1, 3]
    pp = RowSampler(SamplingParams(temperature=0, presence_penalty=2.0))
    assert [pp(logits) for _ in range(4)] == [1, 2, 1, 1]
    rp = RowSampler(SamplingParams(temperature=0, repetition_penalty=2.0), prompt_ids=[1])
    assert rp(logits) == 2  # token 1 is in the prompt: 5 / 2 < 4


def test_logit_bias_min_tokens_and_min_p_shape_the_choice() -> None:
    logits = torch.tensor([0.0, 5.0, 4.0, 2.5])
    assert RowSampler(SamplingParams(temperature=0, logit_bias=((3, 3.0),)))(logits) == 3  # 2.5 + 3 > 5
    assert RowSampler(SamplingParams(temperature=0, logit_bias=((1, -100.0),)))(logits) == 2
    # token 1 ends the row: banned for the first two choices, then allowed
    s = RowSampler(SamplingParams(temperature=0, min_tokens=2), end_ids=frozenset({1}))
    assert [s(logits) for _ in range(4)] == [2, 2, 1, 1]
    assert torch.equal(logits, torch.tensor([0.0, 5.0, 4.0, 2.5]))  # the batch's logits are left alone
    assert SamplingParams(stop_token_ids=(7,), ignore_eos=True).end_ids({0}) == {7}
    assert SamplingParams(stop_token_ids=(7,)).end_ids({0}) == {0, 7}
    # min_p keeps the tokens at least min_p times as likely as the likeliest: 0.4 and 0.3 of these, for 0.5
    probs = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
    kept = RowSampler(SamplingParams(temperature=1.0, min_p=0.5, seed=3))
    assert {kept(probs.log()) for _ in range(300)} == {0, 1}
    free = RowSampler(SamplingParams(temperature=1.0, seed=3))
    assert len({free(probs.log()) for _ in range(300)}) == 5


def test_stop_strings_wait_for_min_tokens_and_may_stay_in_the_text(tok) -> None:
    ids = tok("Hello world. The END is near")["input_ids"]

    def run(asm: TextAssembler) -> str:
        out = ""
        for t in ids:
            out += asm.add(t)
            if asm.stopped:
                return out
        return out + asm.finish()

    assert run(TextAssembler(tok, ("END",), include_stop=True)) == "Hello world. The END"
    assert run(TextAssembler(tok, ("Hello",))) == ""
    assert run(TextAssembler(tok, ("Hello", "END"), min_tokens=2)) == "Hello world. The "  # "Hello": token 1


def test_stop_string_is_held_back_then_cut(tok) -> None:
    ids = tok("Hello world. The END is near")["input_ids"]
    asm = TextAssembler(tok, ("END",))
    emitted = ""
    for t in ids:
        emitted += asm.add(t)
        if asm.stopped:
            break
    assert asm.stopped and emitted == "Hello world. The " and "E" not in emitted.split("The")[-1]


def test_no_stop_emits_everything_and_utf8_is_never_split(tok) -> None:
    text = "naïve café — 日本語 ✓"
    asm = TextAssembler(tok, ())
    out = "".join(asm.add(t) for t in tok(text)["input_ids"]) + asm.finish()
    assert out == text and "\ufffd" not in out


def test_slot_table_evicts_lru_unpinned_and_respects_holds() -> None:
    t = SlotTable(16)
    a, b = t.assign(("a", 1), 8), t.assign(("b", 1), 8)
    t.pin(a)
    assert t.room_for(8) == [b]
    t.hold(b, True)
    assert t.room_for(1) is None  # a pinned row and an operator hold: nothing can go
    t.unpin(a)
    assert t.room_for(8) == [a]


def test_slot_table_shares_its_rows_by_rank() -> None:
    t = SlotTable(2 * 16)  # two slots of rank 16 ...
    small = [t.assign((f"r4-{i}", 1), 4) for i in range(6)]  # ... hold six adapters of rank 4, and room for 8 more
    assert len(t) == 6 and t.room_for(8) == [] and t.room_for(9) == [small[0]]
    assert t.room_for(24) == small[:4] and t.room_for(33) is None
    t.release(small[1])
    t.release(small[3])
    big = t.assign(("r16", 1), 16)  # rows need not be contiguous: the freed ones first
    assert t.rows_of(big) == [4, 5, 6, 7, 12, 13, 14, 15, *range(24, 32)]
    assert big not in small and t.lookup(("r16", 1)) == big  # slot ids are never reused
    t.release(big)
    assert t.lookup(("r16", 1)) is None and t.room_for(16) == []


def test_a_draining_slot_serves_its_own_adapter_again() -> None:
    t = SlotTable(16)
    a = t.assign(("a", 1), 8)
    assert t.drain_one() == a and t.lookup(("a", 1)) is None  # no new rows on it ...
    assert t.undrain(("a", 1)) == a and t.lookup(("a", 1)) == a  # ... unless they want that very version


def test_token_logprobs_give_the_rank_and_the_likeliest() -> None:
    from server.engine.sampling import token_logprobs

    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 1.0, 1.0, 0.0]])
    a, b = token_logprobs(logits, torch.tensor([0, 2]), 2, ranked=True)
    lp = torch.log_softmax(logits, -1)
    assert (a.rank, b.rank) == (4, 2)  # ties: only strictly likelier tokens count
    assert a.logprob == pytest.approx(float(lp[0, 0])) and [i for i, _ in a.top] == [1, 3]
