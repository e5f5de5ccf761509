"""cdi.cli: the `cdi` command. Each subcommand lives in its own module; `main` wires them up."""
