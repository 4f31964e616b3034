"""Greedy decoding from the exported file (prefill, then one token per step with the KV cache) gives
the same tokens as Hugging Face's ``generate(do_sample=False)`` on lowbit's simulated model.

A tiny random model's logits can sit close to ties, where any rounding difference flips a token; so
each test also checks that the simulation's margin between its best and second-best token, at every
generated position, is many times larger than the exported model's logit error on that sequence:
the agreement is then a property of the file, not luck.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lowbit
from lowbit.export import export_llm
from lowbit.export.llm import generate, load_session, run_step
from lowbit.runtime import matmulnbits_inputs
from lowbit.zoo import ByteTokenizer, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["The quick brown fox", "def main():\n    return", "Quantization maps floats to integers",
           "import numpy as np\n"]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def tokenizer():
    return ByteTokenizer()


def _hf_greedy(model, ids: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0).numpy()


def _margin_and_error(model, session, tokens: np.ndarray, start: int) -> tuple[float, float]:
    """Smallest top-1 / top-2 gap of the simulation at the generated positions, and the largest
    |ORT - simulation| logit difference there."""
    with torch.no_grad():
        ref = model(torch.from_numpy(tokens)).logits[0, start - 1:-1]
    top = ref.topk(2).values
    logits, _ = run_step(session, tokens)
    return float((top[:, 0] - top[:, 1]).min()), float(np.abs(logits[0, start - 1:-1] - ref.numpy()).max())


@pytest.mark.parametrize("config, accuracy_level", [("w4a16-g32", 0), ("w4a16-g32", 4), ("w4a16-g128", 4),
                                                    ("w8a16", 4)])
def test_greedy_tokens_equal_the_simulation(tokenizer, tmp_path, config, accuracy_level):
    """At accuracy_level 4 the simulation rounds MatMulNBits' inputs as ORT does
    (``matmulnbits_inputs``), so the logit error is float32 summation order on most sequences (on
    the others one activation sat on a rounding tie and one code differs)."""
    model = lowbit.quantize(tiny_llama(seed=1), None, config, progress=False)
    export_llm(model, tmp_path / "m.onnx", accuracy_level=accuracy_level, max_length=128)
    session = load_session(tmp_path / "m.onnx", threads=1)
    errors = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with matmulnbits_inputs(model, accuracy_level):
            expected = _hf_greedy(model, ids)
            got = generate(session, ids, NEW_TOKENS)
            np.testing.assert_array_equal(got, expected, err_msg=prompt)
            margin, error = _margin_and_error(model, session, expected, ids.shape[1])
        assert margin > 20 * error, f"{prompt!r}: margin {margin:.2e} vs error {error:.2e}: a near tie"
        errors.append(error)
    assert sorted(errors)[len(errors) // 2] < 1e-5, errors


def test_generate_takes_text_batches_and_stops_at_eos(tokenizer, tmp_path):
    model = tiny_llama(seed=1)
    export_llm(model, tmp_path / "f.onnx", max_length=128)
    session = load_session(tmp_path / "f.onnx", threads=1)
    text = generate(session, PROMPTS[0], 6, tokenizer=tokenizer)
    prompt = tokenizer(PROMPTS[0])["input_ids"]
    assert text.shape == (1, len(prompt) + 6) and text[0, :len(prompt)].tolist() == prompt
    batch = np.array([prompt, prompt[::-1]])  # two rows of one length
    both = generate(session, batch, 6)
    np.testing.assert_array_equal(both[:1], text)
    np.testing.assert_array_equal(both[1:], generate(session, batch[1:], 6))
    eos = int(text[0, len(prompt) + 2])  # the third new token: generation stops there
    stopped = generate(session, prompt, 6, eos_token_id=eos)
    first = int(np.argmax(text[0, len(prompt):] == eos))
    np.testing.assert_array_equal(stopped[0], text[0, :len(prompt) + first + 1])


def test_generate_refuses_bad_prompts(tmp_path):
    export_llm(tiny_llama(seed=1), tmp_path / "f.onnx", max_length=32)
    session = load_session(tmp_path / "f.onnx", threads=1)
    with pytest.raises(ValueError, match="tokenizer"):
        generate(session, "text without a tokenizer", 2)
    with pytest.raises(ValueError, match="at least one token"):
        generate(session, np.zeros((1, 0), np.int64), 2)
    with pytest.raises(ValueError, match="33 tokens exceed the 32 this file was exported for"):
        run_step(session, np.zeros((1, 33), np.int64))
    with pytest.raises(ValueError, match="max_length=40"):
        generate(session, np.zeros((1, 30), np.int64), 10)
