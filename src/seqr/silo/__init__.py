"""What one silo owner runs on its own data: the ten tasks, train, calibrate, build, info."""
