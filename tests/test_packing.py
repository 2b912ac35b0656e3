"""Packing: every packed conversation gets exactly the logits it gets alone; no loss crosses a boundary."""

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM

from medgpt.packing import SFTCollator, pack_sequences


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_logits_equal_unpacked(tiny_model_dir, attention):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attention).eval()
    torch.manual_seed(0)
    sequences = [torch.randint(3, 1000, (n,)).tolist() for n in (7, 12, 5, 9)]
    rows = [
        {"input_ids": sequences[0] + sequences[1], "labels": sequences[0] + sequences[1], "seq_lengths": [7, 12]},
        {"input_ids": sequences[2] + sequences[3], "labels": sequences[2] + sequences[3], "seq_lengths": [5, 9]},
    ]
    batch = SFTCollator(pad_token_id=0, dtype=model.dtype)(rows)
    assert batch["attention_mask"].shape == (2, 1, 19, 19)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits
        alone = [model(input_ids=torch.tensor([s])).logits[0] for s in sequences]
        # the thing packing must avoid: restarted positions alone let sequence 2 see sequence 1
        leaky = model(input_ids=batch["input_ids"][:1], position_ids=batch["position_ids"][:1],
                      attention_mask=torch.ones(1, 19, dtype=torch.long)).logits
    torch.testing.assert_close(packed[0, :7], alone[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(packed[0, 7:19], alone[1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(packed[1, :5], alone[2], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(packed[1, 5:14], alone[3], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(leaky[0, 7:19], alone[1], atol=1e-3)


def test_pack_sequences_fills_rows_and_masks_boundaries():
    lengths = [300, 200, 500, 100, 450, 60]
    data = datasets.Dataset.from_dict({
        "input_ids": [[i + 1] * n for i, n in enumerate(lengths)],
        "labels": [[i + 1] * n for i, n in enumerate(lengths)],
    })
    packed = pack_sequences(data, max_length=512, seed=0)
    assert sorted(n for row in packed["seq_lengths"] for n in row) == sorted(lengths)
    assert all(sum(row) <= 512 for row in packed["seq_lengths"])
    assert len(packed) == 4  # 1610 tokens need at least 4 rows of 512
    for row in packed:
        start = 0
        for length in row["seq_lengths"]:
            assert row["labels"][start] == -100  # no loss from the previous sequence into this one
            assert row["input_ids"][start:start + length] == [row["input_ids"][start]] * length
            start += length


def test_collator_pads_unpacked_rows():
    batch = SFTCollator(pad_token_id=0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_flash_collator_flattens_with_restarted_positions():
    rows = [{"input_ids": [1, 2, 3, 4], "labels": [1, 2, 3, 4], "seq_lengths": [2, 2]}, {"input_ids": [5, 6, 7], "labels": [5, 6, 7]}]
    batch = SFTCollator(pad_token_id=0, flatten=True)(rows)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 0, 1, 2]]
    assert batch["labels"].tolist() == [[-100, 2, -100, 4, -100, 6, 7]]
    assert "attention_mask" not in batch


def test_packed_attention_equals_block_masked_sdpa_in_value_and_gradient():
    """Sequence by sequence (grouped-query heads, a one-token sequence) == one row under a block-diagonal mask."""
    import torch.nn.functional as F

    from medgpt.packed_attention import PackedCausalAttention
    from medgpt.packing import block_causal_mask

    torch.manual_seed(0)
    lengths = [7, 1, 30, 12]
    tokens, heads, kv_heads, dim = sum(lengths), 6, 2, 16
    shapes = [(1, heads, tokens, dim), (1, kv_heads, tokens, dim), (1, kv_heads, tokens, dim)]
    inputs = [torch.randn(shape, dtype=torch.float64) for shape in shapes]
    upstream = torch.randn(1, heads, tokens, dim, dtype=torch.float64)
    mask = block_causal_mask([lengths], tokens, torch.float64)

    def run(attend):
        q, k, v = (t.clone().requires_grad_() for t in inputs)
        out = attend(q, k, v)
        out.backward(upstream)
        return out.detach(), q.grad, k.grad, v.grad

    packed = run(lambda q, k, v: PackedCausalAttention.apply(q, k, v, lengths, 0.3))
    masked = run(lambda q, k, v: F.scaled_dot_product_attention(
        q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), attn_mask=mask, scale=0.3))
    for ours, reference in zip(packed, masked):
        torch.testing.assert_close(ours, reference, atol=1e-10, rtol=1e-10)


def test_flattened_batch_under_packed_attention_gives_each_sequence_its_own_logits(tiny_model_dir):
    from medgpt.packed_attention import register

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=register()).eval()
    torch.manual_seed(0)
    sequences = [torch.randint(3, 1000, (n,)).tolist() for n in (7, 12, 5, 9)]
    rows = [{"input_ids": sequences[0] + sequences[1], "labels": sequences[0] + sequences[1], "seq_lengths": [7, 12]},
            {"input_ids": sequences[2] + sequences[3], "labels": sequences[2] + sequences[3], "seq_lengths": [5, 9]}]
    batch = SFTCollator(pad_token_id=0, flatten=True)(rows)
    assert batch["cu_seq_lens_q"].tolist() == [0, 7, 19, 24, 33] and batch["max_length_q"] == 12
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        alone = torch.cat([model(input_ids=torch.tensor([s])).logits[0] for s in sequences])
        # without the boundaries (cu_seq_lens), and for what it leaves to sdpa (sliding windows, soft-capping, sinks),
        # sdpa gets the block-diagonal mask that transformers builds from the restarted position_ids (without a cache,
        # as in training)
        fallback = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        # and padded batches still work
        padded = model(input_ids=torch.tensor([sequences[0], sequences[2] + [0, 0]]),
                       attention_mask=torch.tensor([[1] * 7, [1] * 5 + [0, 0]])).logits
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fallback, alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(padded[1, :5], alone[19:24], atol=1e-5, rtol=1e-4)
