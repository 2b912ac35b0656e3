"""SFT's LM-head loss (medgpt.lm_head_loss): TRL's chunked_nll numbers, gradient taken in the forward pass."""

import pytest
import torch
from trl.trainer import sft_trainer

from medgpt.lm_head_loss import chunked_cross_entropy, in_trl_sft


@pytest.mark.parametrize("case", ["plain", "bias", "scale", "softcap", "shift_labels", "num_items", "trained_head"])
def test_same_loss_metrics_and_gradients_as_trls_chunked_nll(case, monkeypatch):
    monkeypatch.setattr("medgpt.lm_head_loss.chunk_tokens", lambda vocab: 64)  # ~420 answer tokens: 7 chunks
    torch.manual_seed(0)
    rows, length, width, vocab = 2, 300, 32, 1000
    hidden = torch.randn(rows, length, width, dtype=torch.float64, requires_grad=True)
    weight = (torch.randn(vocab, width, dtype=torch.float64) * 0.3).requires_grad_(case == "trained_head")
    bias = torch.randn(vocab, dtype=torch.float64, requires_grad=True) if case == "bias" else None
    labels = torch.randint(0, vocab, (rows, length))
    labels[torch.rand(rows, length) < 0.3] = -100
    options = {"shift_labels": labels} if case == "shift_labels" else {"labels": labels}
    options.update({"num_items": {"num_items_in_batch": torch.tensor(777)}, "scale": {"logit_scale": 0.7},
                    "softcap": {"final_logit_softcapping": 3.0}}.get(case, {}))

    def run(function):
        for tensor in (hidden, weight, bias):
            if tensor is not None:
                tensor.grad = None
        loss, correct, entropy, count = function(hidden, weight, 64, lm_head_bias=bias, **options)
        (3 * loss).backward()
        grads = [t.grad.clone() for t in (hidden, weight, bias) if t is not None and t.requires_grad]
        return [loss.detach().double(), correct.double(), entropy.double(), count.double()], grads

    (ours, our_grads), (trls, trl_grads) = run(chunked_cross_entropy), run(sft_trainer._chunked_cross_entropy_loss)
    # TRL computes in fp32 whatever the inputs' dtype; these are fp64: agreement to fp32's precision
    for name, a, b in zip(("loss", "correct", "entropy", "count"), ours, trls):
        assert a.item() == pytest.approx(b.item(), rel=1e-6), name
    assert ours[3] == (labels != -100).sum() if case == "shift_labels" else (labels[..., 1:] != -100).sum()
    for a, b in zip(our_grads, trl_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5)
    assert len(our_grads) == 1 + (case == "trained_head") + (case == "bias")


def test_bf16_autocast_takes_the_matmuls_in_bf16_and_the_softmax_in_fp32():
    torch.manual_seed(0)
    hidden = torch.randn(1, 200, 64, dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(3000, 64) * 0.05).to(torch.bfloat16)
    labels = torch.randint(0, 3000, (1, 200))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, *_ = chunked_cross_entropy(hidden, weight, 64, labels=labels)
    loss.backward()
    logits = (hidden[0, :-1] @ weight.t()).float()  # what a model's forward gives under autocast, then fp32 loss
    reference = torch.nn.functional.cross_entropy(logits, labels[0, 1:])
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(reference.item(), rel=1e-5)
    assert hidden.grad.dtype == torch.bfloat16 and hidden.grad[0, -1].abs().sum() == 0  # last position predicts nothing


def test_in_trl_sft_swaps_trls_function_only_while_open():
    original = sft_trainer._chunked_cross_entropy_loss
    with in_trl_sft():
        assert sft_trainer._chunked_cross_entropy_loss is chunked_cross_entropy
        with in_trl_sft():  # nested (evaluation inside a training step) leaves it in place
            assert sft_trainer._chunked_cross_entropy_loss is chunked_cross_entropy
        assert sft_trainer._chunked_cross_entropy_loss is chunked_cross_entropy
    assert sft_trainer._chunked_cross_entropy_loss is original


def test_no_gradients_are_computed_under_no_grad(monkeypatch):
    """Evaluation runs under no_grad, where a Function's needs_input_grad still says True: the gradient matmuls
    (and a full fp32 buffer for a trained head's weight) must not run then."""
    hidden = torch.randn(1, 50, 16, requires_grad=True)
    weight = torch.randn(300, 16, requires_grad=True)
    labels = torch.randint(0, 300, (1, 50))
    products = []
    real_matmul = torch.Tensor.__matmul__
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: products.append(a.dim()) or real_matmul(a, b))
    with torch.no_grad():
        evaluated, *_ = chunked_cross_entropy(hidden, weight, 64, labels=labels)
    # the logits come from F.linear, the entropy from a 1-D dot product: no matrix product for gradients
    assert 2 not in products and not evaluated.requires_grad
    products.clear()
    trained, *_ = chunked_cross_entropy(hidden, weight, 64, labels=labels)
    assert products.count(2) == 2 and trained.item() == pytest.approx(evaluated.item())  # d_hidden and d_weight
