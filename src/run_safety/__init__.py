"""The run's safety: durable writes, the identity of what a run reads, faults of the machine,
signals, the one-line errors every command prints. Imports nothing of the project above it."""
