"""What moves a run in and out of other tools' formats."""
