"""featstore build: the orchestrator, options, resume plan, schedule, decode stage, model call, sinks, merge, locks."""
