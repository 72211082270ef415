"""Image classification data: one interface over three sources (package: `spec` the grammar and
constants, `dataset` the Dataset and `load`, one module per source, `images` the image helpers).

Spec grammar (`parse_spec`, `load`)::

    digits[:SPLIT]          scikit-learn's 8x8 digits on a noisy canvas (embedded, offline)
    folder:PATH[:SPLIT]     PATH/<class>/*.{jpg,jpeg,png}, optional PATH/masks/<class>/<stem>.png
    tfds:NAME[:SPLIT]       a prepared tensorflow-datasets image classification dataset
                            (NAME may carry a config, "imagenette/320px-v2"; no version, no slicing)

`load` returns a `Dataset` (one split of one source); `Dataset.batches` yields `Batch`es of
float32 RGB images (B, H, W, 3), int32 labels, stable string ids and, where the source has them,
float32 object masks (B, H, W) in {0, 1}. `Dataset.labels` and `Dataset.ids` are available without
decoding images. The order without shuffling is deterministic; `start` skips the first `start`
examples of the iteration order (for resuming).

Beyond that: `Dataset.take(indices)` returns the examples at those positions as one Batch (random
access; every source except tfds datasets stored as tfrecord, see `Dataset.random_access`),
`Dataset.validate()` decodes everything and raises one UserError naming the bad files, and
`load(..., data_dir=)` is the tfds data directory (default: TFDS_DATA_DIR or ~/tensorflow_datasets).

Split choice: the split in the spec, else `split=`, else `default_split` ("test" falls back to
"validation" then "val"; "validation" falls back to "val" then "test").

Sources and policies

* digits: `sklearn.datasets.load_digits()` (1,797 glyphs, classes "0".."9"), a fixed stratified
  70/30 split (`train_test_split(..., test_size=0.3, stratify=y, random_state=DIGITS_SPLIT_SEED)`,
  1,257 train / 540 test, kept in ascending sklearn index order). Each glyph (0..16 scaled to [0,1])
  is upscaled by an integer factor with nearest neighbour (crisp edges, the mask stays exact) to
  `DIGITS_GLYPH` px and composited white, as max(noise, glyph), at a random position on a
  `DIGITS_CANVAS` px canvas of uniform RGB noise in [0, DIGITS_NOISE). Mask = upscaled glyph >
  DIGITS_MASK_THRESHOLD at the placed position. Placement and noise come from
  `np.random.default_rng([seed, crc32(split), sklearn_index])`: bit-identical for the same seed,
  independent of batching; `take(indices, redraw=k)` draws version k of each glyph from
  `[seed, crc32(split), sklearn_index, 1, k]` instead (training renders a new version every epoch).
  `image_size` renders at that canvas size with glyph
  round(image_size * 32/72) rounded to a multiple of 8 (at least 8); no resampling. Ids
  "digits:SPLIT:NNNNN" with the sklearn index. Rendered per batch (the 8x8 glyphs are held in memory).
* folder: class names = sorted subfolder names (hidden folders and `masks` excluded); images are the
  class folder's direct files ending .jpg/.jpeg/.png (any case; other files are ignored). If PATH has
  `train` plus `test`/`val`/`validation` subfolders, each is a split with its own class folders (and
  its own `masks/`), the class sets must match; "all" is their union. Otherwise "train"/"test" is a
  per-file 80/20 split by SHA-256 of the relative path "class/file" (a file never changes split when
  others are added or removed; stratified in expectation, each class independently) and "all" is
  everything. Ids are paths relative to PATH ("cat/a.png", "train/cat/a.png"). If `masks/` exists,
  every image must have one (nonzero = object; same size as the image, else an error).
* tfds: `tfds.builder(NAME, data_dir=data_dir)` (never downloads). Image feature "image" (else the
  single Image feature that is not "segmentation_mask"), label "label" (else the single ClassLabel),
  class names from that ClassLabel. "segmentation_mask" gives masks: for oxford_iiit_pet the trimap
  (1 pet, 2 background, 3 border) becomes mask = (value == 1); for other datasets mask = nonzero; a
  mask whose size differs from its image is first resized to it (nearest).
  Datasets prepared as array_record/parquet are read with random access through
  `builder.as_data_source` and need no TensorFlow; datasets prepared as tfrecord (the `tfds build`
  default) are streamed through `builder.as_dataset`, which needs TensorFlow (GPU hidden from it) and
  cannot serve `Dataset.take`; shuffling a stream is seeded file shuffling plus a
  `TFDS_SHUFFLE_BUFFER`-example buffer. `Dataset.labels` for tfds costs one pass over the split
  that skips image decoding (done on first use). Ids "NAME:SPLIT:NNNNNNN" by position in the
  unshuffled split.

Images (folder, tfds) are centre-cropped to a square (the shorter side) and resized with PIL
bilinear to `image_size` (masks with nearest); folder images get their EXIF orientation applied.
`image_size` defaults: digits `DIGITS_CANVAS` (72), folder `DEFAULT_IMAGE_SIZE` (224), tfds the
native size when the dataset's image shape is fixed and square (cifar10: 32), else 224.
Grayscale is replicated to RGB, alpha is dropped. `normalization`: "none" ([0, 1]) or "imagenet"
((x - IMAGENET_MEAN) / IMAGENET_STD per channel).

All bad input raises `UserError` with a one-line message naming the problem and the fix.
"""
from resnet_jax.core.data.dataset import Batch, Dataset, check_classes, load, load_for_checkpoint, normalize
from resnet_jax.core.data.digits import digits_glyph_size
from resnet_jax.core.data.spec import (DEFAULT_IMAGE_SIZE, DIGITS_CANVAS, DIGITS_GLYPH, DIGITS_MASK_THRESHOLD,
                                       DIGITS_NOISE, DIGITS_SPLIT_SEED, DIGITS_TEST_SIZE, FOLDER_TEST_FRACTION,
                                       IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, NORMALIZATIONS,
                                       SOURCE_NORMALIZATION, SPEC_HELP, TFDS_EXTRA_MESSAGE, TFDS_SHUFFLE_BUFFER,
                                       default_normalization, parse_spec)
