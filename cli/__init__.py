"""The `dyninfer` command (Typer): one module per command, rendering what the jobs return.

`options` declares the shared options once (defaults come from the jobs' Configs); `output`
holds the consoles, progress, JSON output and one-line errors that name the command's flags.

May import: every layer.
"""
