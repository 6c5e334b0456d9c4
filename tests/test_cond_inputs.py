"""Conditioner inputs: CSV and image loading with clear errors, natural sort, paths, scaling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from modules.cond_inputs import (
    MinMaxScaler,
    list_images,
    load_csv,
    load_images,
    natural_key,
    resolve_param_dir,
)
from modules.errors import UserError

# -----------------------------------------------------------------------------
# CSV


def write(path, text):
    path.write_text(text)
    return path


def test_csv_reads_values_as_float32(tmp_path):
    f = write(tmp_path / "p.csv", "1,2.5,-3\n4e1, 5 ,6\n\n")  # spaces and a trailing blank line
    x = load_csv(f, num_param=3, n_expected=2)
    assert x.dtype == np.float32
    np.testing.assert_array_equal(x, [[1, 2.5, -3], [40, 5, 6]])


def test_csv_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"not found: .*nope\.csv.*param_dir"):
        load_csv(tmp_path / "nope.csv", 3, 2)


def test_csv_path_that_is_a_folder_says_how_to_switch(tmp_path):
    """`--set input_type=csvs` on the demo without changing param_dir (an image folder)."""
    with pytest.raises(UserError, match=r"param_dir points at the folder .* reads one CSV file.*param_dir=/input_data/params\.csv"):
        load_csv(tmp_path, 3, 2)


def test_csv_wrong_column_count_names_found_expected_and_key(tmp_path):
    f = write(tmp_path / "p.csv", "1,2,3,4\n5,6,7,8\n")
    with pytest.raises(UserError) as e:
        load_csv(f, num_param=5, n_expected=2)
    msg = str(e.value)
    assert "p.csv" in msg and "line 1" in msg
    assert "found 4 columns" in msg and "expected 5" in msg and "num_param" in msg


def test_csv_wrong_row_count_names_found_expected_and_keys(tmp_path):
    f = write(tmp_path / "p.csv", "1,2\n3,4\n5,6\n")
    with pytest.raises(UserError) as e:
        load_csv(f, num_param=2, n_expected=4)
    msg = str(e.value)
    assert "found 3 data rows" in msg and "expected 4" in msg
    assert "n_sample" in msg and "Dim1" in msg


def test_csv_non_numeric_cell_names_line_and_column(tmp_path):
    f = write(tmp_path / "p.csv", "1,2,3\n4,5,abc\n")
    with pytest.raises(UserError, match=r"p\.csv, line 2, column 3: 'abc' is not a number"):
        load_csv(f, num_param=3, n_expected=2)


def test_csv_bad_cell_in_the_first_row_gets_the_header_rule(tmp_path):
    f = write(tmp_path / "p.csv", "a,2\n1,2\n")           # one name, one number: a data row, not a header
    with pytest.raises(UserError, match="line 1, column 1: 'a' is not a number.*header line must name every column"):
        load_csv(f, num_param=2, n_expected=2)


@pytest.mark.parametrize("bad", ["nan", "inf", "-Infinity"])
def test_csv_non_finite_value(tmp_path, bad):
    f = write(tmp_path / "p.csv", f"1,2\n3,{bad}\n")
    with pytest.raises(UserError, match="line 2, column 2.*not a finite number"):
        load_csv(f, num_param=2, n_expected=2)


# -----------------------------------------------------------------------------
# images


def test_natural_key_orders_numbers_by_value():
    names = ["10.png", "2.png", "1.png", "img10.png", "img9.png", "Img2.png", "b.png", "a.png"]
    assert sorted(names, key=natural_key) == [
        "1.png", "2.png", "10.png", "a.png", "b.png", "Img2.png", "img9.png", "img10.png"
    ]


def save_grey(path, value, size=(20, 12)):
    Image.fromarray(np.full(size[::-1], value, dtype=np.uint8)).save(path)


def test_images_listed_in_natural_order_and_loaded_greyscale(tmp_path):
    for i in (1, 2, 10):
        save_grey(tmp_path / f"{i}.png", 20 * i)
    (tmp_path / "notes.txt").write_text("ignored")
    Image.fromarray(np.full((9, 9, 3), [255, 0, 0], dtype=np.uint8)).save(tmp_path / "11.PNG")

    files = list_images(tmp_path, ".png", n_expected=4)
    assert [f.name for f in files] == ["1.png", "2.png", "10.png", "11.PNG"]

    x = load_images(files, size=32)
    assert x.shape == (4, 32, 32) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    np.testing.assert_allclose(x[:3].mean(axis=(1, 2)), [20 / 255, 40 / 255, 200 / 255], atol=1e-6)
    np.testing.assert_allclose(x[3], 76 / 255, atol=1e-6)  # pure red in 'L' (ITU-R 601 luma)


def test_sixteen_bit_greyscale_is_rescaled_not_clipped(tmp_path):
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(tmp_path / "0.png")
    x = load_images([tmp_path / "0.png"], size=16)
    np.testing.assert_allclose(x, 32768 / 65535, atol=1e-4)


def test_image_folder_missing(tmp_path):
    with pytest.raises(UserError, match=r"image folder not found: .*nowhere.*param_dir"):
        list_images(tmp_path / "nowhere", ".png")


def test_image_folder_that_is_a_file_says_how_to_switch(tmp_path):
    (tmp_path / "params.csv").write_text("1,2\n")
    with pytest.raises(UserError, match=r"param_dir points at the file .*params\.csv.*read from a folder.*param_dir=/input_data/images"):
        list_images(tmp_path / "params.csv", ".png")


def test_image_folder_without_matching_files(tmp_path):
    save_grey(tmp_path / "1.jpg", 10)
    with pytest.raises(UserError, match=r"no '\.png' files in .*param_data_type"):
        list_images(tmp_path, ".png")


def test_image_count_differs_from_expected(tmp_path):
    for i in range(3):
        save_grey(tmp_path / f"{i}.png", 10)
    with pytest.raises(UserError, match=r"holds 3 '\.png' images, expected 5 \(missing 3\.png, 4\.png; n_sample / Dim1"):
        list_images(tmp_path, "png", n_expected=5)


def test_truncated_image_names_the_file(tmp_path):
    good = tmp_path / "1.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(good)
    bad = tmp_path / "2.png"
    bad.write_bytes(good.read_bytes()[:200])
    with pytest.raises(UserError, match=r"cannot read image .*2\.png"):
        load_images([good, bad])


def test_non_image_file_with_png_extension_names_the_file(tmp_path):
    fake = tmp_path / "3.png"
    fake.write_text("x,y\n1,2\n")
    with pytest.raises(UserError, match=r"cannot read image .*3\.png"):
        load_images(list_images(tmp_path, ".png"))


# -----------------------------------------------------------------------------
# param_dir


def test_resolve_param_dir_follows_the_original_convention(tmp_path):
    cwd = tmp_path / "work"
    assert resolve_param_dir("/images", cwd) == cwd / "images"  # "/images" does not exist
    assert resolve_param_dir(str(tmp_path), cwd) == tmp_path  # an existing absolute path
    assert resolve_param_dir("data/p.csv", cwd) == cwd / "data" / "p.csv"


# -----------------------------------------------------------------------------
# scaler


@pytest.mark.parametrize("shape", [(50, 4), (50, 3, 8)])
def test_scaler_maps_columns_to_range_and_back(shape):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=shape) * rng.uniform(0.1, 100, size=shape[1:]) + 7).astype(np.float32)
    s = MinMaxScaler().fit(x)
    y = s.transform(x)
    assert y.dtype == np.float32 and y.shape == shape
    np.testing.assert_allclose(y.min(axis=0), -0.9, atol=1e-6)
    np.testing.assert_allclose(y.max(axis=0), 0.9, atol=1e-6)
    np.testing.assert_allclose(s.inverse_transform(y), x, rtol=1e-5, atol=1e-4)


def test_scaler_constant_column_has_no_division_by_zero():
    x = np.array([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0]], dtype=np.float32)
    s = MinMaxScaler().fit(x)
    y = s.transform(x)
    assert np.isfinite(y).all()
    np.testing.assert_array_equal(y[:, 1], 0.0)
    np.testing.assert_allclose(s.inverse_transform(y), x)
    # a new value of the column that never varied carries nothing a model learnt: it maps to the middle too
    np.testing.assert_array_equal(s.transform(np.array([[2.0, 7.0]]))[:, 1], 0.0)


def test_scaler_state_dict_round_trip_as_arrays_and_tensors():
    x = np.random.default_rng(1).normal(size=(20, 6)).astype(np.float32)
    s = MinMaxScaler().fit(x)
    state = s.state_dict()
    assert all(isinstance(v, np.ndarray) for v in state.values())
    for restored in (
        MinMaxScaler.from_state_dict(state),
        # checkpoints loaded with weights_only=True hold tensors, not numpy arrays
        MinMaxScaler.from_state_dict({k: torch.from_numpy(v) for k, v in state.items()}),
    ):
        np.testing.assert_array_equal(restored.transform(x), s.transform(x))
        np.testing.assert_array_equal(restored.inverse_transform(x), s.inverse_transform(x))


def test_scaler_rejects_other_columns_and_use_before_fit():
    with pytest.raises(RuntimeError, match="not fitted"):
        MinMaxScaler().transform(np.zeros((2, 3)))
    s = MinMaxScaler().fit(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="columns"):
        s.transform(np.zeros((2, 4)))


def _write_pngs(folder, names, size=(32, 32)):
    from PIL import Image
    folder.mkdir(exist_ok=True)
    for name in names:
        Image.new("L", size, 128).save(folder / name)


def test_a_wrong_image_count_names_the_missing_or_extra_files(tmp_path):
    from modules.cond_inputs import list_images
    from modules.errors import UserError
    _write_pngs(tmp_path / "a", [f"{i}.png" for i in range(1, 7) if i != 4])
    with pytest.raises(UserError, match=r"holds 5 '\.png' images, expected 6 \(missing 4\.png;"):
        list_images(tmp_path / "a", ".png", 6)
    _write_pngs(tmp_path / "b", [f"{i}.png" for i in range(1, 8)])
    with pytest.raises(UserError, match=r"\(extra 7\.png;"):
        list_images(tmp_path / "b", ".png", 6)
    _write_pngs(tmp_path / "c", ["a1.png", "a2.png", "a10.png"])
    with pytest.raises(UserError, match=r"extra, the last in natural order: a10\.png;"):
        list_images(tmp_path / "c", ".png", 2)


def test_images_of_mixed_sizes_warn_once_naming_an_odd_file(tmp_path, caplog):
    from modules.cond_inputs import load_images
    _write_pngs(tmp_path, ["1.png", "2.png"])
    _write_pngs(tmp_path, ["3.png", "4.png"], size=(64, 32))
    files = [tmp_path / f"{i}.png" for i in range(1, 5)]
    with caplog.at_level("WARNING", logger="simulgen"):
        load_images(files, size=16)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert f"{tmp_path / '3.png'} is 64x32" in warnings[0] and "stretched differently" in warnings[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="simulgen"):
        load_images(files[:2], size=16)
    assert not caplog.records


def test_joint_min_max_keeps_the_columns_relative_sizes():
    """lc_target_scaling joint: one range for every column (POD energies survive), own centres."""
    from modules.cond_inputs import MinMaxScaler
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 3)) * [10.0, 1.0, 0.1] + [5.0, -2.0, 0.0]
    joint = MinMaxScaler().fit(x, joint=True)
    y = joint.transform(x)
    spans = y.max(axis=0) - y.min(axis=0)
    assert spans[0] == pytest.approx(1.8) and spans[1] < 0.3 * spans[0] and spans[2] < 0.03 * spans[0]
    np.testing.assert_allclose((y.max(axis=0) + y.min(axis=0)) / 2, 0.0, atol=1e-6)   # each column centred
    np.testing.assert_allclose(joint.inverse_transform(y), x, rtol=1e-5, atol=1e-5)
    per_column = MinMaxScaler().fit(x).transform(x)
    np.testing.assert_allclose(per_column.max(axis=0) - per_column.min(axis=0), 1.8, rtol=1e-6)
