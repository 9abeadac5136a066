"""``edgetl predict``: classify images with an exported artifact (TensorFlow-free, also on the device)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from edgetl.cli._common import handle_errors, out, print_json

HELP = """Classify an image, or every image in a folder, with an exported model: print the top-k labels.

MODEL is a .tflite or .onnx file exported by `edgetl export`, or a bundle folder (its checksums are checked; it runs
--artifact, default the first of tflite_qat_int8, tflite_ptq_int8, tflite_fp32, onnx_qat_int8, onnx_fp32 it has).
Labels and the input contract (size, pixel scaling, dtype) are read from the model file's own metadata (TFLite
Metadata / ONNX metadata_props), exactly as an app reads them; no TensorFlow needed.

Exit status: 0 done, 2 bad input (missing or unreadable model or image, bad flag).
"""


def register(app: typer.Typer) -> None:
    @app.command("predict", help=HELP, no_args_is_help=True)
    @handle_errors
    def predict_cmd(
        model: Path = typer.Argument(..., help="A .tflite/.onnx file or a bundle folder.", show_default=False),
        images: Path = typer.Argument(..., help="An image file or a folder of images.", show_default=False),
        top_k: int = typer.Option(3, "--top-k", "-k", help="How many labels to print per image."),
        artifact: Optional[str] = typer.Option(
            None, "--artifact", metavar="NAME", help="With a bundle folder: the artifact to run (name or file name)."
        ),
        threads: int = typer.Option(1, "--threads", min=1, help="CPU threads per inference."),
        as_json: bool = typer.Option(False, "--json", help="Print the predictions as JSON."),
    ) -> None:
        from edgetl.predict import predict

        result = predict(model, images, top_k=top_k, artifact=artifact, threads=threads)
        if as_json:
            print_json(result)
            return
        for item in result["predictions"]:
            tops = "  ".join(f"{t['label']} {t['score']:.3f}" for t in item["top"])
            out.print(f"{item['image']}: {tops}", highlight=False, soft_wrap=True, markup=False)
