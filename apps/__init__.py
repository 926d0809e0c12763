"""User-facing programs: the `edgevlm` CLI and its subcommands."""
