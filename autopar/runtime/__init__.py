"""Running rank programs: collectives, simulated and distributed execution."""
