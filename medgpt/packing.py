"""Packing several sequences into one row, without attention across them, and the batch collator.

Restarted ``position_ids`` alone do not isolate packed sequences under ``sdpa``/``eager`` (the
second sequence attends to the first), so rows are given a 4D block-diagonal causal mask: each
token sees only earlier tokens of its own sequence. Under flash-attention, and under
packed_attention.py's per-sequence attention (the default for packed SFT on CPUs), the batch is
flattened into one row and the sequences' boundaries go to the kernel instead.
"""

from __future__ import annotations

import torch


def pack_sequences(dataset, max_length: int, seed: int = 0, num_proc: int | None = None):
    """Group tokenized sequences into rows of at most ``max_length`` tokens (best-fit decreasing).

    Each output row has ``input_ids``, ``labels`` and ``seq_lengths`` (the lengths of the sequences
    in it, in order). The first label of every sequence is masked so no loss crosses a boundary.
    Lengths are read from Arrow and rows are written in chunks, so memory stays flat for millions of rows.
    """
    import bisect
    import hashlib

    import datasets
    import numpy as np
    import pyarrow.compute as pc

    from medgpt.data_files import column_values

    # the lengths column when the dataset has one (read without mapping the token ids), else counted
    lengths = (column_values(dataset, "length") if "length" in dataset.column_names
               else column_values(dataset, "input_ids", lambda ids: pc.list_value_length(ids).to_numpy()))
    order = np.lexsort((np.arange(len(lengths)), -lengths))  # longest first, ties by position
    bins: list[list[int]] = []
    by_space: dict[int, list[int]] = {}  # free space -> bins with that much room
    spaces: list[int] = []  # the distinct free spaces, sorted
    for index in order.tolist():
        size = int(lengths[index])
        at = bisect.bisect_left(spaces, size)
        if at == len(spaces):
            target, free = len(bins), max_length - size
            bins.append([index])
        else:
            room = spaces[at]
            target = by_space[room].pop()
            if not by_space[room]:
                del by_space[room], spaces[at]
            bins[target].append(index)
            free = room - size
        if free > 0:
            if free not in by_space:
                by_space[free] = []
                bisect.insort(spaces, free)
            by_space[free].append(target)
    permutation = np.random.default_rng(seed).permutation(len(bins))
    members = datasets.Dataset.from_dict({"members": [bins[i] for i in permutation]})

    def gather(batch):
        flat = [index for group in batch["members"] for index in group]
        part = dataset[flat]  # one gather of the rows this batch packs
        ids, labels = part["input_ids"], part["labels"]
        rows, position = {"input_ids": [], "labels": [], "seq_lengths": []}, 0
        for group in batch["members"]:
            row_ids, row_labels = [], []
            for offset in range(len(group)):
                row_ids += ids[position + offset]
                row_labels += [-100] + list(labels[position + offset][1:])
            rows["input_ids"].append(row_ids)
            rows["labels"].append(row_labels)
            rows["seq_lengths"].append([int(lengths[index]) for index in group])
            position += len(group)
        return rows

    features = datasets.Features({name: datasets.Sequence(datasets.Value("int32"))
                                  for name in ("input_ids", "labels", "seq_lengths")})
    fingerprint = hashlib.sha256(f"{dataset._fingerprint}-{max_length}-{seed}-pack".encode()).hexdigest()[:20]
    workers = num_proc if num_proc and len(members) >= 1000 * num_proc else None
    return members.map(gather, batched=True, batch_size=1000, remove_columns=["members"], features=features,
                       new_fingerprint=fingerprint, desc="Packing conversations", num_proc=workers)


class SFTCollator:
    """Pads a batch (right side); builds block-diagonal masks for packed rows.

    ``flatten=True`` (flash-attention's variable-length kernels, or packed_attention.py's on CPUs) flattens
    the batch into one padding-free row with restarted position_ids and the sequences' boundaries
    (``cu_seq_lens_q/k``, ``max_length_q/k``, as transformers' DataCollatorWithFlattening) instead of masks.
    """

    def __init__(self, pad_token_id: int, dtype: torch.dtype = torch.float32, flatten: bool = False):
        self.pad_token_id = pad_token_id
        self.dtype = dtype
        self.flatten = flatten

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        lengths_per_row = [f.get("seq_lengths") or [len(f["input_ids"])] for f in features]
        if self.flatten:
            return self._flatten(features, lengths_per_row)
        width = max(len(f["input_ids"]) for f in features)
        batch = len(features)
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, width), -100, dtype=torch.long)
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            input_ids[row, :n] = torch.tensor(feature["input_ids"])
            labels[row, :n] = torch.tensor(feature["labels"])
        out = {"input_ids": input_ids, "labels": labels}
        if all(len(lengths) == 1 for lengths in lengths_per_row):
            mask = torch.zeros((batch, width), dtype=torch.long)
            for row, feature in enumerate(features):
                mask[row, : len(feature["input_ids"])] = 1
            out["attention_mask"] = mask
            return out
        out["attention_mask"] = block_causal_mask(lengths_per_row, width, self.dtype)
        out["position_ids"] = restarted_positions(lengths_per_row, width)
        out["num_real_tokens"] = torch.tensor(sum(sum(lengths) for lengths in lengths_per_row))
        return out

    def _flatten(self, features, lengths_per_row):
        ids = [token for f in features for token in f["input_ids"]]
        labels = []
        for feature, lengths in zip(features, lengths_per_row):
            start = 0
            for length in lengths:  # no loss from one sequence's last token into the next sequence
                labels += [-100] + list(feature["labels"][start + 1 : start + length])
                start += length
        flat_lengths = [length for lengths in lengths_per_row for length in lengths]
        bounds = torch.tensor([0, *flat_lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        longest = max(flat_lengths)
        return {
            "input_ids": torch.tensor([ids]),
            "labels": torch.tensor([labels]),
            "position_ids": restarted_positions([flat_lengths], len(ids)),
            "cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds,
            "max_length_q": longest, "max_length_k": longest,
        }


def restarted_positions(lengths_per_row: list[list[int]], width: int) -> torch.Tensor:
    positions = torch.zeros((len(lengths_per_row), width), dtype=torch.long)
    for row, lengths in enumerate(lengths_per_row):
        start = 0
        for length in lengths:
            positions[row, start : start + length] = torch.arange(length)
            start += length
    return positions


def block_causal_mask(lengths_per_row: list[list[int]], width: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (batch, 1, width, width): 0 where a query may attend, dtype-min elsewhere.

    Padding positions attend to themselves only, so no row of the softmax is fully masked.
    """
    allowed = torch.zeros((len(lengths_per_row), width, width), dtype=torch.bool)
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    for row, lengths in enumerate(lengths_per_row):
        start = 0
        for length in lengths:
            end = start + length
            allowed[row, start:end, start:end] = causal[:length, :length]
            start = end
        allowed[row, range(start, width), range(start, width)] = True
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def block_mask_trainer(trainer_class):
    """A subclass of a TRL trainer that accepts the collator's block-diagonal masks.

    TRL counts trained tokens by summing ``attention_mask``, which is meaningless for an additive
    4D mask; the collator sends the real count as ``num_real_tokens`` and this puts it in place.
    """

    class BlockMaskTrainer(trainer_class):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            real = inputs.pop("num_real_tokens", None)
            before = getattr(self, "_total_train_tokens", None)
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if real is not None and before is not None and model.training:
                self._total_train_tokens = before + self.accelerator.gather_for_metrics(real.reshape(1)).sum().item()
                self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
            return result

    BlockMaskTrainer.__name__ = f"BlockMask{trainer_class.__name__}"
    return BlockMaskTrainer
