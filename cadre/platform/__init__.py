"""The local platform: services `cadre up` starts and the environment every process gets."""
