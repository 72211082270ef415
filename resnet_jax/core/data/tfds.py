"""The `tfds:NAME` source: a prepared tensorflow-datasets image classification dataset."""
from __future__ import annotations

import io
import os
import re

import numpy as np
from PIL import Image

from resnet_jax.errors import UserError
from resnet_jax.core.data.images import executor, mask_array, one_line, pil_from_array, rgb_array
from resnet_jax.core.data.spec import (_FALLBACKS, DEFAULT_IMAGE_SIZE, TFDS_EXTRA_MESSAGE, TFDS_SHUFFLE_BUFFER,
                                       choose_split)



def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        if getattr(e, "name", None) in ("tensorflow_datasets", None):
            raise UserError(TFDS_EXTRA_MESSAGE) from None
        raise UserError(f"{TFDS_EXTRA_MESSAGE} (importing tensorflow_datasets failed: {one_line(e)})") from None
    return tfds


def _import_tensorflow(what: str):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
    except ImportError:
        raise UserError(f"{what} is stored as tfrecord, which needs TensorFlow to read: "
                        f"pip install 'resnet-jax[tfds]', or rebuild it without TensorFlow needs: "
                        f"tfds build {what.split(':')[1]} --file_format=array_record") from None
    try:  # keep TensorFlow off the accelerators JAX uses
        tf.config.set_visible_devices([], "GPU")
    except Exception:
        pass
    return tf


class TfdsSource:
    def __init__(self, name: str, requested: str | None, default: str, image_size: int | None,
                 data_dir: str | None):
        tfds = _import_tfds()
        self._tfds, self.name = tfds, name
        not_found = getattr(getattr(tfds.core, "registered", None), "DatasetNotFoundError", ())
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except not_found:
            raise UserError(f"unknown tfds dataset {name!r}: check the name in the catalogue "
                            f"(https://www.tensorflow.org/datasets/catalog)") from None
        except (ValueError, KeyError, AttributeError) as e:
            raise UserError(f"cannot open tfds dataset {name!r}: {one_line(e)[:300]}") from None
        self._builder = builder
        features = builder.info.features
        image_features = {k: f for k, f in features.items() if isinstance(f, tfds.features.Image)}
        self.mask_key = "segmentation_mask" if "segmentation_mask" in image_features else None
        if "image" in image_features:
            self.image_key = "image"
        else:
            candidates = [k for k in image_features if k != self.mask_key]
            if len(candidates) != 1:
                raise UserError(f"tfds:{name} has no single image feature (features: {', '.join(features)}): "
                                f"it is not an image classification dataset")
            self.image_key = candidates[0]
        labels = {k: f for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)}
        if "label" in labels:
            self.label_key = "label"
        elif len(labels) == 1:
            self.label_key = next(iter(labels))
        else:
            raise UserError(f"tfds:{name} has no 'label' class feature (class features: "
                            f"{', '.join(labels) or 'none'}): it is not an image classification dataset")
        self.class_names = tuple(labels[self.label_key].names)
        self._trimap = name.split("/")[0] == "oxford_iiit_pet"
        self.has_masks = self.mask_key is not None
        self._image_keys = [k for k in (self.image_key, self.mask_key) if k is not None]
        shape = getattr(image_features[self.image_key], "shape", (None, None))
        native = shape[0] if shape[0] is not None and shape[0] == shape[1] else None
        self.image_size = int(image_size or native or DEFAULT_IMAGE_SIZE)

        available = [str(s) for s in builder.info.splits.keys()]
        where = f"tfds:{name} in {builder.data_dir}"
        if available:
            self.split = choose_split(requested, default, available, f"tfds:{name}")
        else:  # not prepared (or tfds' mock data, whose split names are unknown)
            self.split = requested or _FALLBACKS.get(default, (default,))[0]
        self.spec = f"tfds:{name}:{self.split}"
        try:
            self._ds = builder.as_data_source(split=self.split)
        except Exception as e:
            if not builder.is_prepared():
                raise UserError(f"{where} is not prepared (resnet-jax never downloads): run `tfds build {name} "
                                f"--data_dir DIR` (add --file_format=array_record to read it without TensorFlow) "
                                f"and pass that data_dir or set TFDS_DATA_DIR") from None
            if not isinstance(e, NotImplementedError):
                raise UserError(f"cannot read {where}: {one_line(e)[:300]}") from None
            self._ds = None  # tfrecord: stream it with TensorFlow
            self._tf = _import_tensorflow(self.spec)
            info = builder.info.splits[self.split]
            self.n = int(info.num_examples)
            self._offsets = np.concatenate([[0], np.cumsum(info.shard_lengths or [])]).astype(np.int64)
        else:
            self.n = len(self._ds)
        self.random_access = self._ds is not None
        self._labels = None
        self._ids = None

    # ids and labels

    @property
    def ids(self) -> list[str]:
        if self._ids is None:
            self._ids = self.ids_at(range(self.n))
        return self._ids

    def ids_at(self, idx):
        return [f"{self.name}:{self.split}:{int(i):07d}" for i in idx]

    @property
    def labels(self) -> np.ndarray:
        if self._labels is None:
            labels = self._stream_labels() if self._ds is None else self._source_labels()
            if len(labels) != self.n:
                raise UserError(f"{self.spec}: read {len(labels)} labels but the split has {self.n} examples: "
                                f"the prepared files are incomplete, rebuild the dataset")
            labels.flags.writeable = False
            self._labels = labels
        return self._labels

    def _source_labels(self) -> np.ndarray:
        tfds = self._tfds
        try:
            src = self._builder.as_data_source(
                split=self.split, decoders={k: tfds.decode.SkipDecoding() for k in self._image_keys})
            out = [int(ex[self.label_key]) for ex in _getitems_chunks(src, self.n)]
        except Exception:
            # tfds.testing.mock_data cannot serve skipped (encoded) features: without TensorFlow it cannot
            # encode images, with it it draws invalid bounding boxes (oxford_iiit_pet). Decode fully instead
            # (a real dataset that fails here fails the same way below, with tfds' own error).
            out = [int(ex[self.label_key]) for ex in _getitems_chunks(self._ds, self.n)]
        return np.asarray(out, dtype=np.int32)

    def _stream_labels(self) -> np.ndarray:
        tfds, key = self._tfds, self.label_key
        ds = self._builder.as_dataset(split=self.split, shuffle_files=False,
                                      decoders={k: tfds.decode.SkipDecoding() for k in self._image_keys})
        ds = ds.map(lambda ex: ex[key]).batch(8192)
        parts = list(tfds.as_numpy(ds))
        return np.concatenate(parts).astype(np.int32) if parts else np.zeros((0,), np.int32)

    # decoding

    def _example(self, ex):
        image = ex[self.image_key]
        img = Image.open(io.BytesIO(image)) if isinstance(image, bytes) else pil_from_array(image)
        size = img.size
        out = rgb_array(img, self.image_size)
        mask = None
        if self.mask_key is not None:
            raw = ex[self.mask_key]
            raw = np.asarray(Image.open(io.BytesIO(raw))) if isinstance(raw, bytes) else np.asarray(raw)
            if raw.ndim == 3:
                raw = raw[:, :, 0]
            binary = raw == 1 if self._trimap else raw != 0
            if binary.shape[::-1] != size:  # not in real datasets; tfds' mock data draws shapes independently
                binary = np.asarray(Image.fromarray(binary).resize(size, Image.NEAREST))
            mask = mask_array(binary, self.image_size)
        return out, int(ex[self.label_key]), mask

    def read(self, idx):
        idx = [int(i) for i in idx]
        examples = _get_many(self._ds, idx)
        results = [self._example(ex) for ex in examples]
        s = self.image_size
        images = np.stack([r[0] for r in results]) if results else np.zeros((0, s, s, 3), np.float32)
        labels = np.asarray([r[1] for r in results], dtype=np.int32)
        masks = None
        if self.has_masks:
            masks = np.stack([r[2] for r in results]) if results else np.zeros((0, s, s), np.float32)
        return images, labels, masks

    def stream(self, batch_size: int, start: int, shuffle: bool, seed: int, drop_remainder: bool):
        tfds, tf = self._tfds, self._tf
        keys = [self.label_key, *self._image_keys]
        split = f"{self.split}[{start}:]" if start and not shuffle else self.split
        read_config = tfds.ReadConfig(add_tfds_id=True, shuffle_seed=int(seed) if shuffle else None)
        ds = self._builder.as_dataset(split=split, shuffle_files=bool(shuffle), read_config=read_config,
                                      decoders={k: tfds.decode.SkipDecoding() for k in self._image_keys})
        ds = ds.map(lambda ex: {k: ex[k] for k in keys + ["tfds_id"]})
        if shuffle:
            ds = ds.shuffle(TFDS_SHUFFLE_BUFFER, seed=int(seed), reshuffle_each_iteration=False)
            if start:
                ds = ds.skip(start)
        ds = ds.batch(batch_size, drop_remainder=drop_remainder)
        position = start
        s = self.image_size
        for raw in tfds.as_numpy(ds):
            n = len(raw[self.label_key])
            examples = [{k: raw[k][j] for k in keys} for j in range(n)]
            results = list(executor().map(self._example, examples))
            ids = [self._stream_id(t, None if shuffle else position + j) for j, t in enumerate(raw["tfds_id"])]
            position += n
            images = np.stack([r[0] for r in results]) if results else np.zeros((0, s, s, 3), np.float32)
            labels = np.asarray([r[1] for r in results], dtype=np.int32)
            masks = np.stack([r[2] for r in results]) if self.has_masks else None
            yield images, labels, ids, masks

    def _stream_id(self, tfds_id: bytes, position: int | None) -> str:
        text = tfds_id.decode() if isinstance(tfds_id, bytes) else str(tfds_id)
        m = re.search(r"-(\d+)-of-(\d+)__(\d+)$", text)
        if m and int(m.group(2)) == len(self._offsets) - 1:
            return f"{self.name}:{self.split}:{int(self._offsets[int(m.group(1))]) + int(m.group(3)):07d}"
        if position is not None:
            return f"{self.name}:{self.split}:{position:07d}"
        return f"{self.name}:{self.split}:{text}"


def _get_many(src, idx: list[int]) -> list:
    getitems = getattr(src, "__getitems__", None)  # batched (parallel) array_record reads
    if getitems is not None:
        try:
            return list(getitems(idx))
        except TypeError:  # tfds.testing.mock_data's data source has an unbound __getitems__
            pass
    return [src[i] for i in idx]


def _getitems_chunks(src, n: int, chunk: int = 1024):
    for b in range(0, n, chunk):
        yield from _get_many(src, list(range(b, min(n, b + chunk))))
