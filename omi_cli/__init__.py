"""`omi-server`: the command line of the Omi unified audio server (serve, stream, vad, identify, enrol)."""
