"""Typer command-line interface: thin rendering over the library."""
