"""What a process runs on: device and precision, process groups, seeded random streams, optional
dependencies and the error types shared across packages."""
