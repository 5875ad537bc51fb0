"""One thin entry point per DVC stage: read params, fan out Ray tasks, write outs."""
