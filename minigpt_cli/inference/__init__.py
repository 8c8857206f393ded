"""The inference side: loading a run, sampling, generate, the engine, the C step, serve."""
