"""The CLI's subcommands, one module each. Each module has `register(commands)`, which adds its
subparser and sets `run` to a function taking the parsed arguments and returning an exit code."""
