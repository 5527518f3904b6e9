"""The `effnet` command: one subcommand module per area of the project."""
