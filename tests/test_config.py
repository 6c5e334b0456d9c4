"""Configuration: the original's files parse unchanged, every bad value is a clear one-line error."""

from __future__ import annotations

import dataclasses
import io
import logging
import re
from pathlib import Path

import pytest

from modules.augment import ConditionerAugmentation, SeriesAugmentation
from modules.config import (
    SECTIONS,
    Preset,
    key_table,
    load_preset,
    parse_condition,
    parse_preset,
    train_split_size,
)
from modules.data import split_indices
from modules.errors import UserError

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
ORIGINAL_CONDITION = FIXTURES / "original_condition.txt"
ORIGINAL_PRESET = FIXTURES / "original_preset.txt"


def original_lines() -> list[str]:
    return ORIGINAL_CONDITION.read_text().splitlines()


def write_condition(tmp_path, *, replace=None, drop=(), extra=()) -> tuple[Path, list[str]]:
    """The original's condition file with some values replaced, some keys dropped, lines appended."""
    replace = dict(replace or {})
    lines = []
    for line in original_lines():
        parts = line.split()
        key = parts[0] if parts else ""
        if key in drop:
            continue
        if key in replace:
            line = f"{key}\t{replace.pop(key)}"
        lines.append(line)
    assert not replace, f"keys not in the fixture: {replace}"
    lines += list(extra)
    path = tmp_path / "condition.txt"
    path.write_text("\n".join(lines) + "\n")
    return path, lines


def line_of(lines: list[str], key: str) -> int:
    """1-based line number of the (last) line whose first word is `key`."""
    numbers = [i for i, ln in enumerate(lines, start=1) if ln.split()[:1] == [key]]
    assert numbers, key
    return numbers[-1]


def error_of(path, overrides=()) -> str:
    with pytest.raises(UserError) as exc:
        parse_condition(path, overrides=overrides)
    msg = str(exc.value)
    assert "\n" not in msg, "errors are one line"
    return msg


def assert_names_file_line_key(msg: str, path: Path, line: int, key: str) -> None:
    assert str(path) in msg, msg
    assert re.search(rf"\bline {line}\b", msg), msg
    assert f"'{key}'" in msg, msg


# -----------------------------------------------------------------------------
# the original's files


def test_original_condition_parses_with_the_verbatim_values():
    cfg = parse_condition(ORIGINAL_CONDITION)
    expected = dict(
        Dim1=484, Dim2=200, Dim3=95008, num_var=1, Training_epochs=10002, Batch_size=16,
        LearningR=0.0005, Latent_dim=8, Latent_dim_end=32, Loss_type=1, Stretch=0, alpha=1000.0,
        num_aug_f=0, num_aug_a=0, rec_graph=0, Recon_iter=1, Dim2_red=200, Dim3_red=95008,
        num_param=1, n_sample=484, param_dir="/images", n_epoch=20000, latent_conditioner_lr=1e-5,
        latent_conditioner_batch=64, latent_conditioner_weight_decay=1e-4,
        latent_conditioner_dropout_rate=0.2, use_spatial_attention=True, input_type="image",
        param_data_type=".png",
    )
    for key, value in expected.items():
        got = cfg.flat()[key]
        assert got == value and type(got) is type(value), (key, got, value)
    assert cfg.vae.loss_name == "MSE"
    assert cfg.conditioner.kind == "image"


def test_original_title_line_only_warns_and_reserved_lines_are_accepted(caplog):
    text = ORIGINAL_CONDITION.read_text()
    assert text.splitlines()[0] == "Common params"
    assert text.count("RESERVED") == 5
    with caplog.at_level(logging.WARNING, logger="simulgen"):
        parse_condition(ORIGINAL_CONDITION)
    warnings = [r.getMessage() for r in caplog.records if r.name == "simulgen"]
    # RESERVED lines are known and silent; the free-text title (line 1) may at most be noted.
    assert all("line 1:" in w and "Common params" in w for w in warnings), warnings


def test_recipe_original_gives_every_optional_key_the_original_value_and_the_default_differs_only_in_its_list():
    from modules.config import ORIGINAL_RECIPE
    cfg = parse_condition(ORIGINAL_CONDITION, ["recipe=original"])
    default = parse_condition(ORIGINAL_CONDITION)
    expected = dict(
        field_scaling="minmax", kl_normalize="none", latent_target="draw", vae_keep_best=False,
        lr_schedule="restarts", spectral_norm=True, output_norm=True, pod_init=False, logvar_init=0.0,
        linear_modes=0, vae_norm="group", lc_label_smoothing=0.2, lc_flip_prob=0.5)
    for key, value in expected.items():
        assert cfg.flat()[key] == value, (key, cfg.flat()[key], value)
    differ = {k for k, v in cfg.flat().items() if v != default.flat()[k]}
    assert differ == set(ORIGINAL_RECIPE) - {k for k, v in ORIGINAL_RECIPE.items() if default.flat()[k] == v} | {"recipe"}
    # a key the file sets wins over the recipe
    assert parse_condition(ORIGINAL_CONDITION, ["recipe=original", "latent_target=mu"]).vae.latent_target == "mu"


def test_defaults_of_optional_keys_are_the_original_values():
    cfg = parse_condition(ORIGINAL_CONDITION, ["recipe=original"])
    expected = dict(
        weight_decay=5e-4, grad_clip=10.0, beta_start=1e-4, beta_end=1e-2, beta_ramp_start=0.3,
        beta_ramp_end=0.8, lr_restart_epochs=0, lr_restart_mult=2, lr_min_factor=1e-4,
        val_split=0.2, val_every=10, use_augmentation=True,
        aug_noise_prob=0.2, aug_noise_level=0.03, aug_scale_prob=0.1, aug_scale_min=0.9,
        aug_scale_max=1.1, aug_shift_prob=0.0, aug_shift_max=0.1, aug_mixup_prob=0.2,
        aug_mixup_alpha=0.2, aug_cutout_prob=0.0, aug_cutout_max=0.1,
        lc_warmup_epochs=10, lc_warmup_start=0.01, lc_lr_min=1e-8, lc_grad_clip=1.0,
        lc_label_smoothing=0.2, lc_mixup_prob=0.15, lc_mixup_alpha=0.2, lc_input_noise_prob=0.1,
        sam_rho=0.05, ema_decay=0.999, dropout_start=0.3, dropout_end=0.1, dataset_dir="",
    )
    for key, value in expected.items():
        assert cfg.flat()[key] == value, (key, cfg.flat()[key], value)
    # The augmentations really receive those defaults.
    assert SeriesAugmentation.from_config(cfg.augment) == SeriesAugmentation(
        noise_prob=0.2, noise_level=0.03, scale_prob=0.1, scale_min=0.9, scale_max=1.1,
        shift_prob=0.0, shift_max=0.1, mixup_prob=0.2, mixup_alpha=0.2, cutout_prob=0.0,
        cutout_max=0.1)
    lc = ConditionerAugmentation.from_config(cfg.conditioner)
    assert (lc.mixup_prob, lc.mixup_alpha, lc.noise_prob) == (0.15, 0.2, 0.1)


def test_config_is_frozen():
    cfg = parse_condition(ORIGINAL_CONDITION)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.data.Dim1 = 3


def test_original_preset_parses():
    p = parse_preset(ORIGINAL_PRESET, 1)
    assert p == Preset(dataset_number=1, beta_exponent=0, encoder_filters=(1024, 512, 256, 128),
                       conditioner_filters=(16, 32, 64, 128))


def test_shipped_condition_and_preset_parse():
    cfg = parse_condition(REPO / "input_data" / "condition.txt")
    assert (cfg.data.Dim1, cfg.data.Dim2, cfg.data.Dim3) == (80, 32, 256)
    assert cfg.run.dataset_dir == "input_data"
    preset = parse_preset(REPO / "preset.txt", 1)
    assert preset.encoder_filters == (64, 32, 16, 8)
    assert preset.conditioner_filters == (16, 32, 64, 128)


# -----------------------------------------------------------------------------
# errors


def test_missing_required_key(tmp_path):
    path, _ = write_condition(tmp_path, drop=("Latent_dim_end",))
    msg = error_of(path)
    assert str(path) in msg and "'Latent_dim_end'" in msg and "missing" in msg


@pytest.mark.parametrize("key, value, words", [
    ("Dim1", "abc", "whole number"),
    ("Batch_size", "16.5", "whole number"),
    ("LearningR", "fast", "not a number"),
    ("LearningR", "nan", "finite"),
    ("use_spatial_attention", "yes", "0 or 1"),
    ("use_spatial_attention", "2", "0 or 1"),
    ("input_type", "mesh", "one of"),
    ("param_data_type", ".gif", "one of"),
])
def test_unconvertible_values(tmp_path, key, value, words):
    path, lines = write_condition(tmp_path, replace={key: value})
    msg = error_of(path)
    assert_names_file_line_key(msg, path, line_of(lines, key), key)
    assert words in msg and value in msg


@pytest.mark.parametrize("key, value", [
    ("Loss_type", "5"),
    ("Loss_type", "0"),
    ("LearningR", "0"),                    # must be strictly positive
    ("LearningR", "-1e-3"),
    ("Dim3", "0"),
    ("num_var", "2"),
    ("latent_conditioner_dropout_rate", "1.5"),
    ("Stretch", "2"),
])
def test_out_of_range_values(tmp_path, key, value):
    path, lines = write_condition(tmp_path, replace={key: value})
    msg = error_of(path)
    assert_names_file_line_key(msg, path, line_of(lines, key), key)
    assert "out of range" in msg


def test_out_of_range_optional_key(tmp_path):
    path, lines = write_condition(tmp_path, extra=["val_split 1.5"])
    msg = error_of(path)
    assert_names_file_line_key(msg, path, len(lines), "val_split")


def test_whole_number_written_as_float_is_accepted(tmp_path):
    path, _ = write_condition(tmp_path, replace={"Training_epochs": "1e3"})
    assert parse_condition(path).vae.Training_epochs == 1000


def test_typo_gets_did_you_mean(tmp_path):
    path, lines = write_condition(tmp_path, extra=["Latent_dim_edn 16"])
    msg = error_of(path)
    assert str(path) in msg and f"line {len(lines)}" in msg
    assert "'Latent_dim_edn'" in msg and "did you mean 'Latent_dim_end'" in msg


def test_case_insensitive_typo_gets_did_you_mean(tmp_path):
    path, lines = write_condition(tmp_path, extra=["learningr 0.001"])
    msg = error_of(path)
    assert f"line {len(lines)}" in msg and "did you mean 'LearningR'" in msg


def test_unknown_unrelated_line_only_warns(tmp_path, caplog):
    path, lines = write_condition(tmp_path, extra=["completely unrelated words 42"])
    with caplog.at_level(logging.WARNING, logger="simulgen"):
        cfg = parse_condition(path)
    assert cfg.data.Dim1 == 484
    warnings = [r.getMessage() for r in caplog.records
                if r.name == "simulgen" and r.levelno == logging.WARNING]
    assert any(f"line {len(lines)}" in w and "completely unrelated" in w for w in warnings), warnings


def test_comments_and_section_markers_are_skipped(tmp_path):
    path, _ = write_condition(tmp_path, replace={"Batch_size": "8 # comment with Batch_size 99"},
                              extra=["% Dim1 3", "' Dim1 3", "# Dim1 3"])
    cfg = parse_condition(path)
    assert cfg.vae.Batch_size == 8 and cfg.data.Dim1 == 484


def test_windows_line_endings_parse(tmp_path):
    path = tmp_path / "condition.txt"
    path.write_bytes("\r\n".join(original_lines()).encode() + b"\r\n")
    assert parse_condition(path) == parse_condition(ORIGINAL_CONDITION)


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "condition.txt"
    path.write_text("\n".join(original_lines()[1:]) + "\n", encoding="utf-8-sig")   # Dim1 on line 1
    assert parse_condition(path).data.Dim1 == 484


def test_key_without_value(tmp_path):
    path, lines = write_condition(tmp_path, extra=["seed"])
    msg = error_of(path)
    assert_names_file_line_key(msg, path, len(lines), "seed")
    assert "no value" in msg


def test_repeated_key_warns_and_the_later_value_wins(tmp_path, caplog):
    path, lines = write_condition(tmp_path, extra=["Batch_size 8"])
    with caplog.at_level(logging.WARNING, logger="simulgen"):
        assert parse_condition(path).vae.Batch_size == 8
    assert any("Batch_size" in r.getMessage() and f"line {len(lines)}" in r.getMessage()
               for r in caplog.records if r.name == "simulgen")


def test_second_value_on_a_line_is_an_error(tmp_path):
    path, lines = write_condition(tmp_path, replace={"Batch_size": "16 32"})
    msg = error_of(path)
    assert_names_file_line_key(msg, path, line_of(lines, "Batch_size"), "Batch_size")


def test_dim2_red_larger_than_dim2(tmp_path):
    path, lines = write_condition(tmp_path, replace={"Dim2_red": "201"})
    msg = error_of(path)
    assert_names_file_line_key(msg, path, line_of(lines, "Dim2_red"), "Dim2_red")
    assert "201" in msg and "200" in msg


def test_dim3_red_larger_than_dim3(tmp_path):
    path, lines = write_condition(tmp_path, replace={"Dim3_red": "95009"})
    msg = error_of(path)
    assert_names_file_line_key(msg, path, line_of(lines, "Dim3_red"), "Dim3_red")


def test_n_sample_must_equal_dim1(tmp_path):
    path, lines = write_condition(tmp_path, replace={"n_sample": "483"})
    msg = error_of(path)
    assert_names_file_line_key(msg, path, line_of(lines, "n_sample"), "n_sample")
    assert "483" in msg and "484" in msg


def test_training_split_size_agrees_with_the_data_split():
    for runs in (2, 3, 5, 10, 80, 484):
        for frac in (0.1, 0.2, 0.5, 0.9):
            train, _ = split_indices(runs, frac, seed=0)
            assert train_split_size(runs, frac) == len(train), (runs, frac)


@pytest.mark.parametrize("key", ["Batch_size", "latent_conditioner_batch"])
def test_a_batch_larger_than_the_training_split_becomes_the_split_with_a_warning(tmp_path, key, caplog):
    """One condition file serves small studies: the batch becomes the training split, and the warning names the
    file, line and key."""
    n_train = train_split_size(484, 0.2)
    assert n_train == 387
    path, lines = write_condition(tmp_path, replace={key: str(n_train)})
    assert parse_condition(path).flat()[key] == n_train          # the largest that fits
    assert not caplog.records
    path, lines = write_condition(tmp_path, replace={key: str(n_train + 1)})
    assert parse_condition(path).flat()[key] == n_train
    (record,) = caplog.records
    assert_names_file_line_key(record.getMessage(), path, line_of(lines, key), key)
    assert f"{n_train + 1} is larger than the {n_train} training runs" in record.getMessage()


def test_batch_check_follows_val_split(tmp_path):
    # 10 runs, val_split 0.5 -> 5 training runs
    path, _ = write_condition(tmp_path, replace={"Dim1": "10", "n_sample": "10", "Batch_size": "6",
                                                 "latent_conditioner_batch": "4"},
                              extra=["val_split 0.5"])
    assert parse_condition(path).vae.Batch_size == 5
    assert parse_condition(path, overrides=["val_split=0.2"]).vae.Batch_size == 6


# -----------------------------------------------------------------------------
# --set overrides


def test_override_replaces_the_file_value():
    cfg = parse_condition(ORIGINAL_CONDITION, overrides=["Training_epochs=5", "aug_mixup_prob=0"])
    assert cfg.vae.Training_epochs == 5 and cfg.augment.aug_mixup_prob == 0.0


def test_a_key_set_twice_on_the_command_line_warns_and_the_later_value_wins(caplog):
    with caplog.at_level(logging.WARNING, logger="simulgen"):
        cfg = parse_condition(ORIGINAL_CONDITION, overrides=["Training_epochs=5", "Training_epochs=7"])
    assert cfg.vae.Training_epochs == 7
    warnings = [r.getMessage() for r in caplog.records if r.name == "simulgen" and r.levelname == "WARNING"]
    assert warnings == ["--set Training_epochs=7: key 'Training_epochs' set twice on the command line; the later "
                        "value wins (first --set Training_epochs=5)"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="simulgen"):      # overriding the file's value: no warning
        parse_condition(ORIGINAL_CONDITION, overrides=["Training_epochs=5"])
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


@pytest.mark.parametrize("override, key", [
    ("Loss_type=9", "Loss_type"),
    ("Dim1=many", "Dim1"),
    ("Batch_size=0", "Batch_size"),
    ("Dim2_red=500", "Dim2_red"),
    ("n_sample=3", "n_sample"),
])
def test_overrides_go_through_the_same_validation(override, key):
    msg = error_of(ORIGINAL_CONDITION, overrides=[override])
    assert "--set" in msg and f"'{key}'" in msg


def test_override_unknown_key():
    msg = error_of(ORIGINAL_CONDITION, overrides=["Trainig_epochs=5"])
    assert "--set" in msg and "'Trainig_epochs'" in msg and "did you mean 'Training_epochs'" in msg
    msg = error_of(ORIGINAL_CONDITION, overrides=["zzz_nothing_like_it=5"])
    assert "--set" in msg and "'zzz_nothing_like_it'" in msg


@pytest.mark.parametrize("bad", ["Training_epochs", "Training_epochs=", "=5", "Training_epochs 5"])
def test_override_malformed(bad):
    msg = error_of(ORIGINAL_CONDITION, overrides=[bad])
    assert "--set" in msg and "KEY=VALUE" in msg


# -----------------------------------------------------------------------------
# spellings and derived defaults


@pytest.mark.parametrize("written", ["csv", "csvs", "CSV"])
def test_csv_is_an_alias_of_csvs(tmp_path, written):
    path, _ = write_condition(tmp_path, replace={"input_type": written})
    assert parse_condition(path).conditioner.kind == "csvs"


@pytest.mark.parametrize("written, expected", [
    (".png", ".png"), ("png", ".png"), (".jpg", ".jpg"), ("jpg", ".jpg"), (".JPG", ".jpg"), ("PNG", ".png"),
])
def test_param_data_type_normalisation(tmp_path, written, expected):
    path, _ = write_condition(tmp_path, replace={"param_data_type": written})
    assert parse_condition(path).conditioner.param_data_type == expected


def test_old_pinn_names_are_accepted(tmp_path):
    path, _ = write_condition(tmp_path, drop=("latent_conditioner_lr",), extra=["pinn_lr 0.002"])
    assert parse_condition(path).conditioner.latent_conditioner_lr == 0.002


def test_derived_defaults(tmp_path):
    path, _ = write_condition(tmp_path, drop=("Dim2_red", "Dim3_red", "n_sample"),
                              replace={"n_epoch": "403"})
    cfg = parse_condition(path)
    assert cfg.data.Dim2_red == 200 and cfg.data.Dim3_red == 95008
    assert cfg.conditioner.n_sample == 484
    assert cfg.conditioner.e2e_epochs == 403 // 4
    assert parse_condition(ORIGINAL_CONDITION).conditioner.e2e_epochs == 20000 // 4
    assert parse_condition(path, overrides=["e2e_epochs=7"]).conditioner.e2e_epochs == 7
    assert parse_condition(path, overrides=["Dim2_red=50"]).data.Dim2_red == 50


# -----------------------------------------------------------------------------
# preset.txt

TWO_BLOCKS = """data_No, init_beta_divisior, num_filter_enc, latent_conditioner_filter
1
0
64 32 16 8
16 32 64 128
2
3
128 64 32
8 16 32 64 128
"""


def test_preset_block_selection(tmp_path):
    path = tmp_path / "preset.txt"
    path.write_text(TWO_BLOCKS)
    assert parse_preset(path, 1) == Preset(1, 0, (64, 32, 16, 8), (16, 32, 64, 128))
    assert parse_preset(path, 2) == Preset(2, 3, (128, 64, 32), (8, 16, 32, 64, 128))
    assert load_preset(path, 2) == parse_preset(path, 2)


@pytest.mark.parametrize("number", [0, 3, 10])
def test_preset_beyond_the_blocks(tmp_path, number):
    path = tmp_path / "preset.txt"
    path.write_text(TWO_BLOCKS)
    with pytest.raises(UserError, match=rf"block {number} does not exist; it has 2 complete blocks"):
        parse_preset(path, number)


def test_preset_short_block(tmp_path):
    path = tmp_path / "preset.txt"
    path.write_text("\n".join(TWO_BLOCKS.splitlines()[:-1]) + "\n")   # block 2 lacks its last line
    assert parse_preset(path, 1).dataset_number == 1
    with pytest.raises(UserError, match="block 2 does not exist; it has 1 complete block"):
        parse_preset(path, 2)


def test_preset_empty_line_inside_a_block(tmp_path):
    path = tmp_path / "preset.txt"
    lines = TWO_BLOCKS.splitlines()
    lines[3] = ""
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=rf"{re.escape(str(path))} line 4: the encoder filter list .* is empty"):
        parse_preset(path, 1)


@pytest.mark.parametrize("row, text, what", [
    (3, "64 32 x 8", "encoder filter list"),
    (4, "16, 32, 64", "conditioner filter list"),
    (4, "16 0 64", "conditioner filter list"),
    (1, "one", "dataset number"),
    (2, "1.5", "KL initial-weight exponent"),
])
def test_preset_bad_values_name_the_line(tmp_path, row, text, what):
    path = tmp_path / "preset.txt"
    lines = TWO_BLOCKS.splitlines()
    lines[row] = text
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError) as exc:
        parse_preset(path, 1)
    msg = str(exc.value)
    assert f"{path} line {row + 1}" in msg and what in msg


def test_preset_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        parse_preset(tmp_path / "nope.txt", 1)


def test_no_preset_without_a_terminal_is_an_error(monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    with pytest.raises(UserError, match="--preset=N"):
        load_preset(ORIGINAL_PRESET, None)


def test_no_preset_on_a_terminal_asks_and_retries_bad_answers(monkeypatch, capsys):
    class FakeTTY(io.StringIO):
        def isatty(self):
            return True

    answers = iter(["two", "2", "3", "64 x 16", "64 32 16", "8 16 32"])
    monkeypatch.setattr("sys.stdin", FakeTTY(""))
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    assert load_preset(ORIGINAL_PRESET, None) == Preset(2, 3, (64, 32, 16), (8, 16, 32))
    assert next(answers, None) is None


# -----------------------------------------------------------------------------
# key table


def test_key_table_lists_every_field_once_with_section_and_help():
    rows = key_table()
    names = [row[1] for row in rows]
    fields = [f.name for cls in SECTIONS.values() for f in dataclasses.fields(cls)]
    assert sorted(names) == sorted(fields) and len(names) == len(set(names))
    sections = {"data", "VAE", "augmentation", "conditioner", "engine", "run"}
    for section, name, default, help_text in rows:
        assert section in sections, (name, section)
        assert help_text.strip(), name
        assert default, name
    by_name = {row[1]: row for row in rows}
    assert by_name["Dim1"][2] == "required"
    assert by_name["Dim2_red"][2] == "derived"
    assert by_name["weight_decay"][2] == "0.0005"


def test_list_keys_prints_each_section_once_with_its_keys_under_it():
    import subprocess
    import sys

    from modules.config import FIELDS, SECTION_OF, SECTIONS
    out = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "SimulGen-VAE.py"), "--list_keys"],
                         capture_output=True, text=True, check=True).stdout
    headers = [line[1:-1] for line in out.splitlines() if line.startswith("[")]
    assert headers == [cls.SECTION for cls in SECTIONS.values()]
    section, listed = None, {}
    for line in out.splitlines():
        if line.startswith("["):
            section = line[1:-1]
        elif line.strip():
            listed[line.split()[0]] = section
    assert listed == {key: SECTIONS[SECTION_OF[key]].SECTION for key in FIELDS}


def test_the_docs_document_every_key_and_the_readme_every_flag_in_at_most_450_lines():
    from pathlib import Path

    from modules.cli import build_parser
    from modules.config import FIELDS
    root = Path(__file__).resolve().parents[1]
    readme, keys = (root / "README.md").read_text(), (root / "docs/configuration.md").read_text()
    missing = [k for k in FIELDS if f"`{k}`" not in keys]
    assert not missing, f"docs/configuration.md lacks keys: {missing}"
    flags = [s for a in build_parser()._actions for s in a.option_strings if s.startswith("--") and s != "--help"
             and a.help != "==SUPPRESS=="]
    assert not [f for f in flags if f"`{f}" not in readme], "README lacks flags"
    assert len(readme.splitlines()) <= 450 and "## Contents" in readme
    for link in ("docs/configuration.md", "docs/training.md", "docs/prediction.md", "docs/performance.md"):
        assert link in readme and (root / link).is_file()
