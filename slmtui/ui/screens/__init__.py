"""The console's pushed screens: inspect a run, help, prompts."""
