"""The runtime around a run, apart from its stages and its training engine: signals (stop at a step
boundary, emergency cleanups), secrets (a type, and masking), start-up (the collector paused while importing),
the user-error type, progress bars."""
