"""The label tables against cityscapesscripts, the vectorised helpers and their errors."""
import numpy as np
import pytest
import torch
from cityscapesscripts.helpers.labels import labels as official_labels

from rtda.datasets import DatasetError
from rtda.datasets.labels import (
    CLASS_NAMES,
    ID_TO_TRAIN_ID,
    IGNORE_INDEX,
    NUM_CLASSES,
    PALETTE,
    TRAIN_ID_TO_ID,
    check_train_ids,
    colorize,
    label_ids_to_train_ids,
    train_ids_to_label_ids,
)


def test_tables_match_cityscapesscripts():
    for label in official_labels:
        if label.id >= 0:
            expected = label.trainId if 0 <= label.trainId < NUM_CLASSES else IGNORE_INDEX
            assert ID_TO_TRAIN_ID[label.id] == expected, label.name
    assert (ID_TO_TRAIN_ID[34:] == IGNORE_INDEX).all()
    # The 19 evaluated ids, road .. bicycle, as published with the data set.
    assert TRAIN_ID_TO_ID[:NUM_CLASSES].tolist() == [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28,
                                                     31, 32, 33]
    assert TRAIN_ID_TO_ID[IGNORE_INDEX] == 0
    assert CLASS_NAMES[0] == "road" and CLASS_NAMES[-1] == "bicycle" and len(CLASS_NAMES) == NUM_CLASSES
    assert PALETTE.shape == (NUM_CLASSES, 3) and PALETTE.dtype == np.uint8
    assert PALETTE[0].tolist() == [128, 64, 128]  # road
    with pytest.raises(ValueError):
        ID_TO_TRAIN_ID[0] = 1  # the shared tables are read-only


def test_round_trip_and_torch_inputs():
    train_ids = np.array([[*range(NUM_CLASSES), IGNORE_INDEX]], dtype=np.uint8)
    label_ids = train_ids_to_label_ids(train_ids)
    assert label_ids.dtype == np.uint8
    back = label_ids_to_train_ids(label_ids, "x.png")
    assert back.tolist() == train_ids.tolist()
    as_torch = train_ids_to_label_ids(torch.from_numpy(train_ids).long())
    assert isinstance(as_torch, torch.Tensor) and as_torch.tolist() == label_ids.tolist()


def test_colorize_numpy_and_torch():
    train_ids = np.array([[0, 18], [IGNORE_INDEX, 5]], dtype=np.uint8)
    rgb = colorize(train_ids)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].tolist() == PALETTE[0].tolist() and rgb[0, 1].tolist() == PALETTE[18].tolist()
    assert rgb[1, 0].tolist() == [0, 0, 0]  # ignore is black
    assert torch.equal(colorize(torch.from_numpy(train_ids)), torch.from_numpy(rgb))


def test_unknown_label_id_names_file_and_values():
    label_ids = np.array([[7, 34], [200, 33]], dtype=np.uint8)
    with pytest.raises(DatasetError, match=r"labels/00042\.png: values 34, 200 are not Cityscapes label ids"):
        label_ids_to_train_ids(label_ids, "labels/00042.png")
    with pytest.raises(DatasetError, match="values -1 "):
        label_ids_to_train_ids(np.array([-1, 7]), "x.png")


def test_check_train_ids():
    ok = np.array([0, 18, 255], dtype=np.uint8)
    assert check_train_ids(ok, "p.png") is ok
    with pytest.raises(DatasetError, match=r"p\.png: values 19, 254 are not train ids"):
        check_train_ids(np.array([0, 19, 254], dtype=np.uint8), "p.png")
