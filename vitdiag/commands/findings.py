"""`vitdiag findings`: judge a saved report again, without the model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vitdiag.commands.common import Shared, shared

Report = Annotated[
    Path,
    typer.Argument(
        help="A report.json that `vitdiag report --out` wrote (or its folder), or any "
        "command's --json document.",
        show_default=False,
    ),
]


def read_document(path: Path) -> dict:
    """A results document from a file or a report folder, or one sentence saying what is wrong."""
    import json

    from vitdiag.errors import VitdiagError

    if path.is_dir():
        path = path / "report.json"
    if not path.is_file():
        raise VitdiagError(f"{path} does not exist: give a report.json or its report folder.")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise VitdiagError(f"cannot read {path} ({e.strerror}); check its permissions.") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VitdiagError(
            f"{path} is not valid JSON ({e}); give the report.json vitdiag wrote."
        ) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("results"), list):
        raise VitdiagError(
            f"{path} is not a vitdiag results document (no 'results' list); give the "
            "report.json that vitdiag report wrote."
        )
    return doc


@shared("json_out")
def findings(report: Report, opts: Shared = None) -> None:
    """Apply every findings rule to a saved results document and print what they find."""
    from vitdiag.findings import evaluate, findings_block
    from vitdiag.report import console, print_findings
    from vitdiag.results import dumps, json_to_stdout, write_json_text
    from vitdiag.validation import Output, check_outputs

    check_outputs([Output("--json", opts.json_out)], [str(report)])
    block = findings_block(evaluate(read_document(report)))
    print_findings(console(stderr=json_to_stdout(opts.json_out)), block["items"])
    if opts.json_out is not None:
        write_json_text(dumps(block), opts.json_out)
