"""The decode batch behind generation and serving: preallocated cache, rows leaving and joining."""

from __future__ import annotations

import torch

from sepit.models.generation import DecodeBatch, PreallocatedKVLayer

QUESTIONS = ["What is the function of <protein>?", "Where is <protein> located in the cell?",
             "Describe <protein>.", "Which pathway involves <protein>?"]
SEQS = ["MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ", "MSDNGPQ", "MAHHHHHHVDDDDKMLLLWWPPQRSTV", "MKV"]


def _inputs(processor, idx: list[int]) -> dict:
    return processor.generation_inputs([QUESTIONS[i] for i in idx], [(SEQS[i], None, None) for i in idx])


def _alone(model, processor, i: int, steps: int) -> list[int]:
    """Greedy tokens of prompt i decoded on its own (no eos cut: raw argmax sequence)."""
    s = model.build_generation_inputs(**_inputs(processor, [i]))
    b = DecodeBatch.prefill(model, model.llm, s.inputs_embeds, s.attention_mask, s.position_ids, steps)
    out = []
    for _ in range(steps):
        tok = b.logits.float().argmax(-1)
        out.append(int(tok[0]))
        b.step(tok)
    return out


@torch.inference_mode()
def test_rows_joining_and_leaving_decode_as_they_would_alone(model, processor):
    steps = 10
    expected = [_alone(model, processor, i, steps) for i in range(4)]

    def prefill(idx):
        s = model.build_generation_inputs(**_inputs(processor, idx))
        return DecodeBatch.prefill(model, model.llm, s.inputs_embeds, s.attention_mask, s.position_ids, 4)

    # Rows 0 and 2 start; row 3 joins after 3 steps, row 1 after 5; row 2 leaves after 6 tokens.
    batch, rows = prefill([0, 2]), [0, 2]
    got: dict[int, list[int]] = {i: [] for i in range(4)}
    for step in range(steps + 5):
        if step == 3:
            batch.concat(prefill([3]), headroom=steps)
            rows.append(3)
        if step == 5:
            batch.concat(prefill([1]), headroom=steps)
            rows.append(1)
        tok = batch.logits.float().argmax(-1)
        for r, t in zip(rows, tok.tolist()):
            got[r].append(t)
        keep = [k for k, r in enumerate(rows) if len(got[r]) < (6 if r == 2 else steps)]
        if not keep:
            break
        batch.keep(keep)
        rows = [rows[k] for k in keep]
        batch.step(tok[keep])
    assert got[2] == expected[2][:6]
    for i in (0, 1, 3):
        assert got[i] == expected[i], i


def test_preallocated_layer_writes_in_place_and_grows():
    layer = PreallocatedKVLayer(capacity=70)
    k = torch.randn(2, 1, 5, 4)
    keys, _ = layer.update(k, k.clone())
    buffer = layer._k
    assert torch.equal(keys, k) and layer.get_seq_length() == 5
    for _ in range(60):  # within capacity: same buffer, no reallocation
        step = torch.randn(2, 1, 1, 4)
        keys, values = layer.update(step, step)
        assert torch.equal(keys[:, :, -1:], step)
    assert layer._k is buffer and layer.get_seq_length() == 65
    layer.update(torch.randn(2, 1, 10, 4), torch.randn(2, 1, 10, 4))  # past capacity: grows, keeps the past
    assert layer._k.shape[2] >= 75 and torch.equal(layer.keys[:, :, :5], k)
    layer.batch_select_indices(torch.tensor([1]))
    assert layer.keys.shape == (1, 1, 75, 4) and torch.equal(layer.keys[0, :, :5], k[1])
    layer.drop_left(5)
    assert layer.get_seq_length() == 70 and layer.keys.shape[2] == 70


def test_generate_stops_rows_at_eos_and_keeps_greedy_answers(model, processor):
    ids = model.generate(**_inputs(processor, list(range(len(QUESTIONS)))), max_new_tokens=10)
    for i, row in enumerate(ids):
        alone = _alone(model, processor, i, 10)
        cut = alone.index(model.token_ids.eos) if model.token_ids.eos in alone else len(alone)
        assert row == alone[:cut]
