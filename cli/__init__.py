"""meshplan's command line: typer commands, rich output, errors mapped to exit codes.

Torch is imported only inside the commands that need it (profile, launch, validate).
"""
