"""Stage 9, a job from config to folder: config checks before any expensive work (validate), the
conductor that plans, generates, scores and writes (sweep), its vector step (vectorstage), merge,
manifest and status (finish), the task dispatch (tasks), the run log (runlog) and the CLI's
checks and messages (cli)."""
