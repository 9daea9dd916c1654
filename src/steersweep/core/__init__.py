"""Stage 0, what every stage stands on: the config schemas and their allowed values, the one
exception hierarchy, sizes and units, atomic file IO, package paths, the machine's limits (runtime)
and progress reporting. Imports nothing else from the package and never torch."""
