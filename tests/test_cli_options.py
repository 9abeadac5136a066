"""Defaults in one place: every recipe key has a flag of its command, with the config model's default and help.

Walks FinetuneConfig / ExportConfig / VerifyConfig (nested models too: augment.rotation -> --augment-rotation) and the
click commands typer builds from edgetl's app; no training, no TensorFlow (milliseconds).
"""

from __future__ import annotations

import pytest
import typer
from pydantic import BaseModel

from edgetl.cli import app
from edgetl.config import CALIBRATION_IMAGES, ExportConfig, FinetuneConfig, VerifyConfig
from edgetl.verify.checks import Thresholds

MODELS = {"finetune": FinetuneConfig, "export": ExportConfig, "verify": VerifyConfig}


def _keys(model: type[BaseModel], prefix: str = ""):
    """(dotted key, flag, field) for every leaf key of ``model``."""
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _keys(ann, f"{prefix}{name}.")
        else:
            key = prefix + name
            yield key, "--" + key.replace(".", "-").replace("_", "-"), field


def _options(command: str) -> dict[str, object]:
    """Long flag name -> click option of ``edgetl COMMAND``."""
    cmd = typer.main.get_command(app).commands[command]
    return {opt: p for p in cmd.params for opt in p.opts if opt.startswith("--")}


def _same_default(flag_default, model_default, param) -> bool:
    if param.multiple:  # repeatable flags (--format, --quantization): a list of the model's value(s)
        wanted = model_default if isinstance(model_default, list) else [model_default]
        return list(flag_default or []) == wanted
    if isinstance(flag_default, str) and not isinstance(model_default, str) and model_default is not None:
        return flag_default == str(model_default)  # --threads takes "1,2": its default is the model's as text
    return flag_default == model_default


@pytest.mark.parametrize("command", sorted(MODELS))
def test_every_recipe_key_has_a_flag_with_the_models_default_and_help(command):
    options = _options(command)
    missing, wrong_default, wrong_help = [], [], []
    for key, flag, field in _keys(MODELS[command]):
        param = options.get(flag)
        if param is None:
            missing.append(f"{key} ({flag})")
            continue
        model_default = ... if field.is_required() else field.get_default(call_default_factory=True)
        flag_default = ... if param.required else param.default
        if not _same_default(flag_default, model_default, param):
            wrong_default.append(f"{flag}: flag {flag_default!r} vs model {model_default!r}")
        if not field.description or not (param.help or "").startswith(field.description):
            wrong_help.append(flag)
    assert not missing, f"recipe keys without a flag of `edgetl {command}`: {missing}"
    assert not wrong_default, f"flag defaults that differ from the config model's: {wrong_default}"
    assert not wrong_help, f"flags whose help is not the config field's description: {wrong_help}"


def test_threshold_defaults_come_from_verify_config():
    assert Thresholds() == VerifyConfig().thresholds()
    for name, field in VerifyConfig.model_fields.items():
        if name in Thresholds.__dataclass_fields__:
            assert Thresholds.__dataclass_fields__[name].default == field.default, name


def test_one_calibration_count_for_finetune_export_and_the_cli():
    from edgetl.export import DEFAULT_CALIBRATION

    assert FinetuneConfig.model_fields["calibration_images"].default == CALIBRATION_IMAGES
    assert ExportConfig.model_fields["calibration_images"].default == CALIBRATION_IMAGES
    assert DEFAULT_CALIBRATION == CALIBRATION_IMAGES
    assert _options("export")["--calibration-images"].default == CALIBRATION_IMAGES


def test_flags_reach_the_config(tmp_path, monkeypatch):
    """The new finetune flags (nested augment ones too) end up in the FinetuneConfig the command builds."""
    from typer.testing import CliRunner

    import edgetl.finetune

    seen = {}

    def fake_finetune(cfg, reporter, force=False):  # stop before training: only the parsed config matters here
        seen["cfg"] = cfg
        raise typer.Exit(0)

    monkeypatch.setattr(edgetl.finetune, "finetune", fake_finetune)
    res = CliRunner().invoke(
        app,
        [
            "finetune",
            "--data",
            str(tmp_path),
            "--head-lr",
            "0.002",
            "--dropout",
            "0.3",
            "--patience",
            "2",
            "--calibration-images",
            "64",
            "--no-augment-flip",
            "--augment-rotation",
            "0.1",
            "--label-smoothing",
            "0.1",
            "--name",
            "x",
        ],
    )
    assert res.exit_code == 0, res.output
    cfg = seen["cfg"]
    assert (cfg.head_lr, cfg.dropout, cfg.patience, cfg.calibration_images) == (0.002, 0.3, 2, 64)
    assert (cfg.augment.flip, cfg.augment.rotation, cfg.augment.zoom) == (False, 0.1, 0.1)
    assert (cfg.label_smoothing, cfg.name) == (0.1, "x")
    assert cfg.model_dump(
        exclude={"data", "head_lr", "dropout", "patience", "calibration_images", "augment", "label_smoothing", "name"}
    ) == FinetuneConfig(data=str(tmp_path)).model_dump(
        exclude={"data", "head_lr", "dropout", "patience", "calibration_images", "augment", "label_smoothing", "name"}
    )
