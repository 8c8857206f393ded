"""`minigpt bench`: what measures both phases."""
