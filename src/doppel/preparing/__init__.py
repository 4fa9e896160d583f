"""`prepare`: an export's messages → sessions, people, privacy, the train/eval split, the dataset files."""
