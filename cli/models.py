"""`dyninfer models`: the model types dyninfer is tested on, and which stages apply to each."""

from rich import box
from rich.table import Table

from dyninfer.cli import options as opt
from dyninfer.cli.output import print_json, stdout
from dyninfer.core.families import support_table

HELP = """The model types dyninfer is tested on, and which stages apply to each.

Any other decoder whose modules follow the standard rotary layout (model.embed_tokens, model.layers, model.norm, model.rotary_emb and lm_head, decoder layers with self_attn and an MLP) is recognised too, whatever its model_type; the tested ones are built from their transformers config classes and checked against transformers' own forward and greedy decoding.

Examples:

    dyninfer models

    dyninfer models --json
"""  # noqa: E501 (help paragraphs are one line each: Typer keeps line breaks)


def models(json_out: opt.Json = False) -> None:
    rows = support_table()
    if json_out:
        print_json({"command": "models", "model_types": rows})
        return
    table = Table(box=box.SIMPLE_HEAD, title=f"{len(rows)} tested model types")
    for column in rows[0]:
        table.add_column(column)
    for row in rows:
        table.add_row(*row.values())
    stdout.print(table)
