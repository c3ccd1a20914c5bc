"""`@shared`: the options every command shares, declared once and handed over as one value."""

from __future__ import annotations

import typer
from typer.testing import CliRunner

from vitdiag.commands.common import Shared, shared


def _app(seen: dict) -> typer.Typer:
    app = typer.Typer()

    @shared("model", "image_interpolation", "json_out")
    def cmd(interpolation: str = "bicubic", opts: Shared = None) -> None:
        seen.update(own=interpolation, opts=opts)

    app.command()(cmd)
    app.command("other")(lambda: None)  # two commands, so `cmd` is a subcommand as in vitdiag
    return app


def test_shared_options_reach_the_command_in_one_value():
    seen: dict = {}
    args = ["cmd", "--arch", "vit_tiny_patch16_224", "--model-arg", "num_heads=2", "--ema"]
    result = CliRunner().invoke(_app(seen), [*args, "--image-interpolation", "bilinear"])
    assert result.exit_code == 0, result.output
    opts = seen["opts"]
    assert (opts.arch, opts.model_arg, opts.ema, opts.interpolation) == (
        "vit_tiny_patch16_224",
        ["num_heads=2"],
        True,
        "bilinear",
    )
    assert opts.json_out is None and opts.batch_size == 64  # not this command's options: defaults


def test_own_interpolation_does_not_overwrite_the_image_interpolation():
    # variance and fix-posembed: --interpolation resamples the position table, and
    # --image-interpolation resizes the images; the second must not take the first's value.
    seen: dict = {}
    result = CliRunner().invoke(_app(seen), ["cmd", "--interpolation", "nearest"])
    assert result.exit_code == 0, result.output
    assert seen["own"] == "nearest"
    assert seen["opts"].interpolation is None


def test_shared_options_follow_the_command_own_in_the_signature():
    import inspect

    @shared("data", "model")
    def cmd(ckpt: str | None = None, opts: Shared = None, later: int = 1) -> None: ...

    names = list(inspect.signature(cmd).parameters)
    assert names == ["ckpt", "data", "arch", "ema", "unsafe_pickle", "model_arg", "native_size",
                     "later"]  # fmt: skip
