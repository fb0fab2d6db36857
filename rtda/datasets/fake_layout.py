"""Random-content trees in the released GTA5 and Cityscapes file layouts, for checks that read real layouts."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def write_layout_tree(root: Path, train_images: int, val_images: int, stored_hw: dict, seed: int = 0) -> dict:
    """Random-content images with blocky random label-id maps, in the released layouts; returns the roots.

    root/GTA5/{images,labels}/NNNNN.png (palettised label ids), root/Cityscapes/{leftImg8bit,gtFine}/{split}/{city}/
    (greyscale labelIds) and root/pseudo/{city}/{stem}.png (train ids, for the self-supervised FDA config).
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 256, 768, dtype=np.uint8).tolist()

    def pair(hw):
        image = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
        blocks = rng.integers(0, 34, (hw[0] // 16 + 1, hw[1] // 16 + 1), dtype=np.uint8)
        return image, np.kron(blocks, np.ones((16, 16), np.uint8))[:hw[0], :hw[1]]

    def save(path: Path, img) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, compress_level=0 if img.mode == "RGB" else 1)  # noise does not compress: store it

    gta5, cityscapes, pseudo = root / "GTA5", root / "Cityscapes", root / "pseudo"
    for i in range(train_images):
        image, ids = pair(stored_hw["gta5"])
        label = Image.fromarray(ids)
        label.putpalette(palette)  # mode P whose indices are the label ids, as GTA5 ships them
        save(gta5 / "images" / f"{i + 1:05d}.png", Image.fromarray(image))
        save(gta5 / "labels" / f"{i + 1:05d}.png", label)
    for split, count, cities in (("train", train_images, ("aachen", "bremen")), ("val", val_images, ("frankfurt",))):
        for i in range(count):
            city = cities[i % len(cities)]
            stem = f"{city}_{i:06d}_000019"
            image, ids = pair(stored_hw["cityscapes"])
            save(cityscapes / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", Image.fromarray(image))
            save(cityscapes / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", Image.fromarray(ids))
            if split == "train":
                train_ids = rng.integers(0, 19, ids.shape, dtype=np.uint8)
                train_ids[: ids.shape[0] // 4] = 255
                save(pseudo / city / f"{stem}.png", Image.fromarray(train_ids))
    return {"gta5": str(gta5), "cityscapes": str(cityscapes), "pseudo": str(pseudo)}
