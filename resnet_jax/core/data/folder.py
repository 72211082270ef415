"""The `folder:PATH` source: PATH/<class>/*.{jpg,jpeg,png}, optional masks, split by folder or hash."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from resnet_jax.errors import UserError
from resnet_jax.core.data.images import executor, mask_array, one_line, rgb_array
from resnet_jax.core.data.spec import FOLDER_TEST_FRACTION, IMAGE_EXTENSIONS, choose_split



class FolderSource:
    random_access = True

    def __init__(self, path: str, requested: str | None, default: str, image_size: int, spec: str):
        root = Path(os.path.expanduser(path)).resolve()
        if not root.exists():
            raise UserError(f"data folder {root} does not exist: check the path in {spec!r}")
        if not root.is_dir():
            raise UserError(f"{root} is not a folder: folder:PATH needs a folder of class subfolders")
        self.root, self.image_size = root, int(image_size)
        split_dirs = [d for d in ("train", "test", "val", "validation") if (root / d).is_dir()]
        if "train" in split_dirs and len(split_dirs) > 1:
            scans = {d: self._scan(root / d, f"{d}/") for d in split_dirs}
            ref = scans["train"][0]
            for d in split_dirs[1:]:
                names = scans[d][0]
                if names != ref:
                    only_train, only_other = sorted(set(ref) - set(names)), sorted(set(names) - set(ref))
                    raise UserError(f"{root}: class folders differ between train and {d} (only in train: "
                                    f"{only_train or 'none'}; only in {d}: {only_other or 'none'}): give every "
                                    f"split the same class folders")
            available = split_dirs + ["all"]
            self.split = choose_split(requested, default, available, f"folder {root}")
            entries = [e for d in split_dirs for e in scans[d][1]] if self.split == "all" else scans[self.split][1]
            class_names = ref
        else:
            class_names, entries = self._scan(root, "")
            self.split = choose_split(requested, default, ("train", "test", "all"), f"folder {root}")
            if self.split != "all":
                want_test = self.split == "test"
                entries = [e for e in entries if _hash_is_test(e[0]) == want_test]
        self.class_names = class_names
        self.spec = f"folder:{root}:{self.split}"
        self.n = len(entries)
        self.ids = [e[0] for e in entries]
        self.labels = np.asarray([e[1] for e in entries], dtype=np.int32)
        self.labels.flags.writeable = False
        self._masks = [e[2] for e in entries]  # path relative to the root, or None
        self.has_masks = bool(entries) and all(m is not None for m in self._masks)
        if self.n == 0:
            raise UserError(f"split {self.split!r} of {root} is empty: add images or use split 'all'")

    @staticmethod
    def _scan(root: Path, prefix: str):
        """Returns (class_names, [(id, label, mask id | None)]) of a flat class folder root; ids are
        relative to the dataset root (`prefix` is this root's path below it)."""
        classes = sorted(e.name for e in os.scandir(root)
                         if e.is_dir() and not e.name.startswith(".") and e.name != "masks")
        if not classes:
            raise UserError(f"{root} has no class subfolders: put the images in {root}/<class>/*.jpg|*.png")
        masks_root = root / "masks"
        has_masks = masks_root.is_dir()
        entries, missing = [], []
        for label, name in enumerate(classes):
            files = sorted(e.name for e in os.scandir(root / name)
                           if e.is_file() and not e.name.startswith(".")
                           and e.name.lower().endswith(IMAGE_EXTENSIONS))
            if not files:
                raise UserError(f"class folder {root / name} has no images (.jpg, .jpeg, .png): add images "
                                f"or remove the folder")
            mask_stems = {}
            if has_masks and (masks_root / name).is_dir():
                mask_stems = {os.path.splitext(e.name)[0]: f"{prefix}masks/{name}/{e.name}"
                              for e in os.scandir(masks_root / name)
                              if e.is_file() and e.name.lower().endswith(".png")}
            for f in files:
                mask = None
                if has_masks:
                    mask = mask_stems.get(os.path.splitext(f)[0])
                    if mask is None:
                        missing.append(f"{name}/{f}")
                entries.append((f"{prefix}{name}/{f}", label, mask))
        if missing:
            raise UserError(f"{len(missing)} image(s) under {root} have no mask, e.g. {missing[0]} needs "
                            f"{masks_root}/{os.path.splitext(missing[0])[0]}.png: add the masks or remove "
                            f"{masks_root}")
        return classes, entries

    def _decode(self, i: int):
        path = self.root / self.ids[i]
        mask_path = None if self._masks[i] is None else self.root / self._masks[i]
        try:
            with Image.open(path) as img:
                img.load()
                img = ImageOps.exif_transpose(img)
                size = img.size
                image = rgb_array(img, self.image_size)
        except Exception as e:  # PIL raises many types for bad files
            raise UserError(f"cannot read image {path} ({one_line(e)}): fix or delete the file") from None
        mask = None
        if mask_path is not None:
            try:
                with Image.open(mask_path) as m:
                    m.load()
                    raw = np.asarray(m)
            except Exception as e:
                raise UserError(f"cannot read mask {mask_path} ({one_line(e)}): fix or delete the file") from None
            if raw.shape[1::-1] != size:
                raise UserError(f"mask {mask_path} is {raw.shape[1]}x{raw.shape[0]} but image {path} is "
                                f"{size[0]}x{size[1]}: a mask must have its image's size")
            binary = raw[..., :3].any(axis=-1) if raw.ndim == 3 else raw != 0
            mask = mask_array(binary, self.image_size)
        return image, mask

    def ids_at(self, idx):
        return [self.ids[i] for i in idx]

    def read(self, idx):
        results = list(executor().map(self._decode, [int(i) for i in idx]))
        images = np.stack([r[0] for r in results]) if results else np.zeros(
            (0, self.image_size, self.image_size, 3), np.float32)
        masks = None
        if self.has_masks:
            masks = np.stack([r[1] for r in results]) if results else np.zeros(
                (0, self.image_size, self.image_size), np.float32)
        return images, self.labels[idx], masks

    def validate(self, progress: bool = False) -> int:
        from tqdm.auto import tqdm

        bad = []

        def check(i):
            try:
                self._decode(i)
            except UserError as e:
                return str(e)
            return None

        for msg in tqdm(executor().map(check, range(self.n)), total=self.n, unit="img", disable=not progress,
                        desc=f"checking {self.split} images", leave=False):
            if msg is not None:
                bad.append(msg)
        if bad:
            raise UserError(f"{len(bad)} of {self.n} files under {self.root} are unreadable; first: {bad[0]}"
                            + (f"; also: {'; '.join(b.split(' (')[0] for b in bad[1:5])}" if len(bad) > 1 else ""))
        return self.n


def _hash_is_test(rel: str) -> bool:
    """Per-file split by the SHA-256 of the path relative to the class root (stable when files change)."""
    h = int.from_bytes(hashlib.sha256(rel.encode("utf-8")).digest()[:8], "big")
    return h < FOLDER_TEST_FRACTION * 2.0 ** 64
