"""The MLflow side: flow runs, registered versions and their aliases, the one promotion path."""
