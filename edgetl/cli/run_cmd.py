"""`edgetl run RECIPE.yaml`: every stage of a recipe, in order, each reading the previous one's directory."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from edgetl.cli._common import console, handle_errors, out, print_json
from edgetl.errors import ConfigError

BUILTIN_DATA = {"builtin:shapes"}


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """``--set finetune.epochs=3``: dotted key, YAML-parsed value."""
    import yaml

    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r} is not KEY=VALUE", "use e.g. --set finetune.epochs=3")
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(
                    f"--set {key}: {part} is not a section", "set a key inside a section, e.g. finetune.epochs"
                )
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(value)
        except yaml.YAMLError:
            node[parts[-1]] = value
    return raw


def resolve_builtin_data(data: str) -> str:
    if data not in BUILTIN_DATA:
        return data
    from edgetl.demo import make_shapes

    return str(make_shapes(Path("models") / ".cache" / "shapes"))


def precheck(recipe, ft, force: bool = False) -> None:
    """Cheap checks of every stage's settings before any stage starts (a typo in `export:` must not surface only
    after an hour of training): backbone, image size, data folder layout, export formats and quantizations."""
    from edgetl.backbones import check_image_size, get_backbone

    if "finetune" in recipe.stages:
        backbone = get_backbone(ft.backbone)
        check_image_size(backbone, ft.image_size or backbone.default_size)
        from edgetl.data import scan_folder

        folder = scan_folder(ft.data)
        if ft.val_data:
            scan_folder(ft.val_data, classes=folder.classes)
    if "finetune" in recipe.stages:  # an earlier run (or a foreign folder) at finetune.out: refuse before training
        from edgetl.finetune import default_run_dir
        from edgetl.fsutil import check_target
        from edgetl.manifest import RUN_FOLDER

        check_target(default_run_dir(ft), RUN_FOLDER, force)
    if "export" in recipe.stages and recipe.export.out:
        from edgetl.fsutil import check_target
        from edgetl.manifest import BUNDLE_FOLDER

        check_target(recipe.export.out, BUNDLE_FOLDER, force, "export.out")
    if "export" in recipe.stages:
        from edgetl.export import select_variants

        # without a finetune stage the run's QAT model is unknown here: check the names only
        has_qat = ft.qat if "finetune" in recipe.stages else True
        select_variants(recipe.export.format, recipe.export.quantization, has_qat=has_qat)


def run_recipe(path: Path, overrides: list[str], reporter, as_json: bool = False, force: bool = False) -> int:

    from edgetl.config import FinetuneConfig, load_recipe, parse_recipe

    recipe = load_recipe(path)
    if overrides:
        raw = apply_overrides(recipe.model_dump(exclude_unset=True), overrides)
        recipe = parse_recipe(raw, str(path))
    ft = recipe.finetune
    if ft.data in BUILTIN_DATA:
        ft = FinetuneConfig.model_validate({**ft.model_dump(), "data": resolve_builtin_data(ft.data)})
    if not ft.name and recipe.name:
        ft = FinetuneConfig.model_validate({**ft.model_dump(), "name": recipe.name})
    precheck(recipe, ft, force)
    summary: dict = {"recipe": str(path), "stages": recipe.stages}
    from edgetl.finetune import default_run_dir

    run_dir = default_run_dir(ft)
    if "finetune" in recipe.stages:
        from edgetl.cli.finetune_cmd import render_run
        from edgetl.finetune import finetune

        console.rule("[bold]finetune")
        result = finetune(ft, reporter, force=force)
        run_dir = result.run_dir
        if not as_json:
            render_run(result, False)
        summary["run_dir"] = str(run_dir)
        summary["metrics"] = result.manifest["metrics"]
        summary["weights"] = result.manifest["weights"]
    if "export" in recipe.stages:
        from edgetl.cli.export_cmd import render_export
        from edgetl.export import export_run

        console.rule("[bold]export")
        ex = recipe.export
        result = export_run(
            run_dir,
            format=ex.format,
            quantization=ex.quantization,
            out=Path(ex.out) if ex.out else None,
            samples=ex.samples,
            seed=ft.seed,
            calibration=ex.calibration_images,
            reporter=reporter,
            force=force,
        )
        if not as_json:
            render_export(result, False)
        summary["bundle"] = str(result.bundle_dir)
    if "verify" in recipe.stages:
        from edgetl.verify import default_report_dir, verify
        from edgetl.verify.report import render

        console.rule("[bold]verify")
        vc = recipe.verify
        report = verify(
            run_dir,
            data=vc.data,
            threads=vc.threads,
            runs=vc.runs,
            warmup=vc.warmup,
            thresholds=vc.thresholds(),
            bundle_sample=vc.bundle_sample,
        )
        written = report.write(Path(vc.report) if vc.report else default_report_dir(run_dir))
        render(report, console if as_json else out)
        console.print(f"report: {written / 'report.md'}", highlight=False)
        summary["verify"] = {
            "verdict": report.verdict,
            "passed": report.passed,
            "report": str(written),
            "failures": report.failures,
            "inconclusive": report.undecided,
        }
        if as_json:
            print_json(summary)
        return report.exit_code
    if as_json:
        print_json(summary)
    return 0


def register(app: typer.Typer) -> None:
    @app.command(
        help=(
            "Run every stage declared in a YAML recipe (finetune -> export -> verify). Each stage's keys are the long "
            "flag names of its command, with underscores (val_split: --val-split; nested augment.rotation: "
            "--augment-rotation), same defaults (see recipes/quickstart.yaml); misspelt keys fail with a suggestion. `data: builtin:shapes` "
            "uses the embedded offline demo data set. Exit 0 when verify passes, 1 when a check fails, 4 when a check is inconclusive, 2 on bad input."
        )
    )
    @handle_errors
    def run(
        recipe: Path = typer.Argument(..., help="Path of the YAML recipe."),
        set_: Optional[list[str]] = typer.Option(
            None, "--set", help="Override a key: --set finetune.epochs=3 (repeatable)."
        ),
        as_json: bool = typer.Option(False, "--json", help="Print a JSON summary."),
        force: bool = typer.Option(
            False,
            "--force",
            help="Replace an earlier run and bundle at the recipe's output "
            "folders (as finetune/export --force); without it a rerun is refused.",
        ),
    ) -> None:
        from edgetl.progress import RichReporter

        code = run_recipe(recipe, set_ or [], RichReporter(), as_json, force)
        raise typer.Exit(code)
