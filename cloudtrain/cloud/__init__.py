"""The cloud layer: the only place boto3 is imported."""
